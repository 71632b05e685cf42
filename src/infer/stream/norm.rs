//! Global percentile normalization without the volume in memory: percentiles of a
//! bounded, strided sample of whole read units (chunks, or blocks of planes), and the
//! `--norm-stats` file that lets every worker of a split job map intensities the same.
//!
//! The sample: when the volume holds at most `max_samples` voxels it is read whole and
//! the percentiles are exact. Otherwise blocks of the reader's unit (shrunk until a
//! block is at most 1/512 of the budget) are taken, one per cell of an even partition
//! of the volume (the same fraction of blocks along each axis) at a pseudo-random place
//! within its cell (stratified, so periodic structure does not alias), and the
//! percentiles of their union are used.
//! `sampling_error_on_test_volumes` (tests/stream_infer.rs) measures the error against
//! the exact percentiles; the bound it asserts is stated in `infer --help`.

use crate::error::{Error, Result};
use crate::imaging::normalize::percentiles;
use crate::imaging::stream::{Region, VolumeReader};
use crate::infer::stitch::Affine;
use crate::model::FixedNorm;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Voxels of the default sample (16 MB of f32, twice that while the percentiles are
/// selected): bounded whatever the volume.
pub const DEFAULT_SAMPLE_VOXELS: usize = 4 << 20;

/// The percentile values of one view.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViewStats {
    pub p_lo_value: f64,
    pub p_hi_value: f64,
    /// Voxels the values came from.
    pub sampled_voxels: usize,
    /// Whether the whole volume was read (exact percentiles).
    pub exact: bool,
    /// The values are a model's fixed normalization (nothing sampled), not percentiles.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fixed: bool,
}

impl ViewStats {
    /// The stats of a model's fixed normalization.
    pub fn of_fixed(f: &FixedNorm) -> Self {
        ViewStats {
            p_lo_value: f.low,
            p_hi_value: f.high,
            sampled_voxels: 0,
            exact: true,
            fixed: true,
        }
    }
    pub fn affine(&self) -> Affine {
        if self.fixed {
            return Affine::two_point(self.p_lo_value, self.p_hi_value);
        }
        Affine::from_percentile_values(self.p_lo_value, self.p_hi_value)
    }
    /// Both percentiles equal (a constant volume, or one whose range is a single
    /// value): the §6 map is undefined, so the output is the input (see `infer_file`).
    pub fn is_degenerate(&self) -> bool {
        !self.fixed && self.p_hi_value == self.p_lo_value
    }
}

/// The `--norm-stats` file: the percentiles every worker must use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NormStats {
    pub format: String,
    /// (z, y, x) of the input the values were measured on.
    pub dims: [usize; 3],
    /// The percentiles (LOW, HIGH) measured.
    pub percentiles: [f64; 2],
    /// One per input view.
    pub views: Vec<ViewStats>,
}

pub const NORM_STATS_FORMAT: &str = "rln-engine norm-stats 1";

impl NormStats {
    pub fn affines(&self) -> Vec<Affine> {
        self.views.iter().map(|v| v.affine()).collect()
    }

    /// Reads a stats file and checks that it was made for an input of `dims` and for
    /// these percentiles.
    pub fn load_checked(path: &Path, dims: [usize; 3], pct: [f64; 2], views: usize) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let s: NormStats =
            serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not a norm-stats file ({e})")))?;
        if s.format != NORM_STATS_FORMAT {
            return Err(Error::format(
                path,
                format!("format {:?}, expected {NORM_STATS_FORMAT:?}", s.format),
            ));
        }
        if s.dims != dims {
            return Err(Error::format(
                path,
                format!(
                    "made for an input of {:?} voxels, this input is {dims:?}: remove it or pass another --norm-stats file",
                    s.dims
                ),
            ));
        }
        if s.percentiles != pct {
            return Err(Error::format(
                path,
                format!(
                    "made for percentiles {:?}, this run uses {pct:?}: remove it, or pass the same --percentiles",
                    s.percentiles
                ),
            ));
        }
        if s.views.len() != views {
            return Err(Error::format(
                path,
                format!("holds {} view(s), the model takes {views}", s.views.len()),
            ));
        }
        if s.views
            .iter()
            .any(|v| !v.p_lo_value.is_finite() || !v.p_hi_value.is_finite())
        {
            return Err(Error::format(path, "holds a non-finite percentile value"));
        }
        Ok(s)
    }

    /// Writes the file atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::invalid(e.to_string()))?;
        crate::fsutil::write_atomic(path, text.as_bytes())
    }
}

/// The blocks the sample is made of: evenly spaced blocks of (a shrunk) read unit,
/// at most `max_samples` voxels in all; the whole volume when it fits.
pub fn sample_regions(dims: [usize; 3], unit: [usize; 3], max_samples: usize) -> Vec<Region> {
    let total: usize = dims.iter().product();
    let max_samples = max_samples.max(1);
    let mut block = [0, 1, 2].map(|a| unit[a].clamp(1, dims[a]));
    if total <= max_samples {
        // read all of it, in slabs of whole units
        let dz = block[0];
        return (0..dims[0].div_ceil(dz))
            .map(|i| {
                let z0 = i * dz;
                Region::new([z0, 0, 0], [(z0 + dz).min(dims[0]) - z0, dims[1], dims[2]])
            })
            .collect();
    }
    // blocks small enough that at least 512 of them make the sample: a tail percentile
    // of a few large, internally correlated blocks is off by percents (measured)
    while block.iter().product::<usize>() * 512 > max_samples && block.iter().any(|&b| b > 1) {
        let a = (0..3).max_by_key(|&a| block[a]).expect("three axes");
        block[a] = block[a].div_ceil(2);
    }
    let grid = [0, 1, 2].map(|a| dims[a].div_ceil(block[a]));
    let g: usize = grid.iter().product();
    let m = (max_samples / block.iter().product::<usize>()).clamp(1, g);
    // the same fraction f of the grid along each axis, f³·g ≈ m
    let f = (m as f64 / g as f64).cbrt();
    let mut counts = [0, 1, 2].map(|a| ((grid[a] as f64 * f).round() as usize).clamp(1, grid[a]));
    // rounding may overshoot the budget: trim the axis with the most blocks
    while counts.iter().product::<usize>() > m {
        let a = (0..3).max_by_key(|&a| counts[a]).expect("three axes");
        counts[a] -= 1;
    }
    // stratified: one block per cell of a counts[0]×counts[1]×counts[2] partition of
    // the grid, at a position within its cell drawn (deterministically) per cell and
    // axis, so that the sample does not alias with periodic structure
    let pick = |a: usize, i: usize, cell: u64| -> usize {
        let u = (splitmix64(cell.wrapping_mul(3).wrapping_add(a as u64)) >> 11) as f64 / (1u64 << 53) as f64;
        (((i as f64 + u) * grid[a] as f64 / counts[a] as f64) as usize).min(grid[a] - 1)
    };
    let mut out = Vec::with_capacity(counts.iter().product());
    for iz in 0..counts[0] {
        for iy in 0..counts[1] {
            for ix in 0..counts[2] {
                let cell = ((iz * counts[1] + iy) * counts[2] + ix) as u64;
                let b = [pick(0, iz, cell), pick(1, iy, cell), pick(2, ix, cell)];
                let start = [0, 1, 2].map(|a| b[a] * block[a]);
                let shape = [0, 1, 2].map(|a| (start[a] + block[a]).min(dims[a]) - start[a]);
                out.push(Region::new(start, shape));
            }
        }
    }
    out
}

/// A well-mixed 64-bit hash (SplitMix64's finalizer).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Percentiles `pct` of `reader` from at most `max_samples` voxels (see the module doc).
pub fn sample_stats(reader: &dyn VolumeReader, pct: [f64; 2], max_samples: usize) -> Result<ViewStats> {
    let dims = reader.dims();
    let regions = sample_regions(dims, reader.read_unit(), max_samples);
    let n: usize = regions.iter().map(|r| r.voxels()).sum();
    let mut sample = vec![0.0f32; n];
    let mut at = 0;
    for r in &regions {
        reader.read_region(*r, &mut sample[at..at + r.voxels()])?;
        at += r.voxels();
    }
    if let Some(i) = sample.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "the input holds a non-finite value ({}): clean the volume (e.g. replace NaN with 0) before inference",
            sample[i]
        )));
    }
    let v = percentiles(&sample, &pct)?;
    Ok(ViewStats {
        p_lo_value: v[0],
        p_hi_value: v[1],
        sampled_voxels: n,
        exact: n == dims.iter().product::<usize>(),
        fixed: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_volumes_are_read_whole_and_large_ones_sampled_within_budget() {
        let r = sample_regions([10, 20, 30], [4, 20, 30], 1 << 20);
        assert_eq!(r.iter().map(|r| r.voxels()).sum::<usize>(), 6000);
        let dims = [200, 300, 400];
        let r = sample_regions(dims, [32, 64, 64], 1 << 20);
        let n: usize = r.iter().map(|r| r.voxels()).sum();
        assert!((1 << 17..=1 << 20).contains(&n), "{n}");
        for reg in &r {
            assert!(reg.fits(dims));
        }
        // spread over the whole depth
        assert!(r.iter().any(|x| x.start[0] < 50) && r.iter().any(|x| x.end()[0] > 150));
        // TIFF-like plane units are shrunk to blocks
        let r = sample_regions([100, 2000, 2000], [1, 2000, 2000], 1 << 20);
        assert!(r.iter().map(|r| r.voxels()).sum::<usize>() <= 1 << 20);
        assert!(r.len() >= 256);
    }
}
