//! Crop and stitch (rln-spec.md §7): tile planning, linear-ramp blending, and a z-slab
//! streaming loop that reads input planes and emits finished output planes, so a volume
//! never has to fit in memory as a whole.
//!
//! Each tile has a *core* (the region its prediction is blended into) and an *input
//! window*: the core extended by `context` voxels on every side that is not the volume
//! border, so that the prediction over the core does not see the tile's edge. With
//! `context` ≥ the network's receptive radius (about 17 voxels) and even window starts
//! (so the half-resolution part pools the same voxel pairs as on the whole volume),
//! tiled inference equals whole-volume inference up to float rounding. `context = 0`
//! is the authors' tiling. Cores of neighbouring tiles overlap by `overlap` voxels and
//! are blended with separable linear ramps, then divided by the summed weights.

use crate::error::{Error, Result};

/// The network's receptive radius, rounded up to an even number: the default context.
pub const RECEPTIVE_RADIUS: usize = 18;

/// Overlap of neighbouring tile cores in (z, y, x) (spec §7).
pub const DEFAULT_OVERLAP: [usize; 3] = [10, 24, 24];

/// One tile along one axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AxisTile {
    /// Core [start, end): blended into the output.
    pub core: (usize, usize),
    /// Input window [start, end) ⊇ core: what the network sees.
    pub window: (usize, usize),
    /// Overlap of the core with the previous / next core (0 at the volume border).
    pub overlap_before: usize,
    pub overlap_after: usize,
}

/// Splits an axis of `len` voxels into cores of at most `max_core` voxels overlapping by
/// `overlap`, each with an input window extended by `context` (window starts even).
pub fn plan_axis(len: usize, max_core: usize, overlap: usize, context: usize) -> Vec<AxisTile> {
    assert!(len > 0 && max_core > 0);
    if len <= max_core {
        return vec![AxisTile {
            core: (0, len),
            window: (0, len),
            overlap_before: 0,
            overlap_after: 0,
        }];
    }
    let overlap = overlap.min(max_core / 2);
    let step = max_core - overlap;
    let n = (len - overlap).div_ceil(step);
    // evenly spread core starts from 0 to len − max_core, on even positions
    let last = len - max_core;
    let starts: Vec<usize> = (0..n)
        .map(|i| {
            let s = if n == 1 { 0 } else { (i * last + (n - 1) / 2) / (n - 1) };
            if i == n - 1 {
                last
            } else {
                s & !1
            }
        })
        .collect();
    let mut tiles = Vec::with_capacity(n);
    for (i, &s) in starts.iter().enumerate() {
        let e = s + max_core;
        let w0 = s.saturating_sub(context) & !1;
        let w1 = (e + context).min(len);
        let before = if i == 0 {
            0
        } else {
            (starts[i - 1] + max_core).saturating_sub(s)
        };
        let after = if i + 1 == n { 0 } else { e.saturating_sub(starts[i + 1]) };
        tiles.push(AxisTile {
            core: (s, e),
            window: (w0, w1),
            overlap_before: before,
            overlap_after: after,
        });
    }
    tiles
}

/// Blending weight of position p (absolute) in a tile: a linear ramp across each
/// overlap with a neighbour, strictly positive inside the core.
pub fn ramp_weight(t: &AxisTile, p: usize) -> f32 {
    let (c0, c1) = t.core;
    debug_assert!(p >= c0 && p < c1);
    let mut w = 1.0f32;
    if t.overlap_before > 0 {
        let d = (p - c0 + 1) as f32 / (t.overlap_before + 1) as f32;
        w = w.min(d);
    }
    if t.overlap_after > 0 {
        let d = (c1 - p) as f32 / (t.overlap_after + 1) as f32;
        w = w.min(d);
    }
    w
}

/// The weights of a tile's core along one axis.
pub fn ramp_weights(t: &AxisTile) -> Vec<f32> {
    (t.core.0..t.core.1).map(|p| ramp_weight(t, p)).collect()
}

/// A 3-D tiling: the per-axis plans; tiles are their cartesian product.
#[derive(Clone, Debug)]
pub struct TilePlan {
    pub dims: [usize; 3],
    pub axes: [Vec<AxisTile>; 3],
}

impl TilePlan {
    pub fn new(dims: [usize; 3], max_core: [usize; 3], overlap: [usize; 3], context: usize) -> Result<Self> {
        if dims.contains(&0) {
            return Err(Error::invalid(format!("cannot tile an empty volume {dims:?}")));
        }
        // spec §7: no z overlap when the depth is below 40
        let oz = if dims[0] < 40 { 0 } else { overlap[0] };
        let axes = [
            plan_axis(dims[0], max_core[0].max(2), oz, context),
            plan_axis(dims[1], max_core[1].max(2), overlap[1], context),
            plan_axis(dims[2], max_core[2].max(2), overlap[2], context),
        ];
        Ok(TilePlan { dims, axes })
    }
    pub fn count(&self) -> usize {
        self.axes.iter().map(|a| a.len()).product()
    }
    /// The largest input window, in voxels (what one prediction must hold).
    pub fn max_window(&self) -> [usize; 3] {
        let m = |a: &Vec<AxisTile>| a.iter().map(|t| t.window.1 - t.window.0).max().unwrap_or(0);
        [m(&self.axes[0]), m(&self.axes[1]), m(&self.axes[2])]
    }
}

/// Chooses the largest core size whose input window fits `max_window_voxels`, shrinking
/// the largest dimension first (sizes kept even).
pub fn choose_core(dims: [usize; 3], context: usize, max_window_voxels: usize) -> [usize; 3] {
    let mut core = dims;
    let window = |c: [usize; 3]| -> usize {
        (0..3)
            .map(|i| {
                if c[i] >= dims[i] {
                    dims[i]
                } else {
                    (c[i] + 2 * context).min(dims[i])
                }
            })
            .product()
    };
    while window(core) > max_window_voxels {
        let i = (0..3).max_by_key(|&i| core[i]).unwrap();
        if core[i] <= 16 {
            break;
        }
        core[i] = ((core[i] * 3 / 4).max(16)) & !1;
    }
    core
}

/// Where input planes come from: the whole volume in memory, or a file read by slabs.
pub trait PlaneSource {
    /// (z, y, x) size of the volume.
    fn dims(&self) -> [usize; 3];
    /// Planes z0..z1 of the volume, each H·W values, z-major (borrowed when the source
    /// holds them in memory).
    fn read_planes(&mut self, z0: usize, z1: usize) -> Result<std::borrow::Cow<'_, [f32]>>;
}

/// Where finished output planes go, in increasing z, each call one or more whole planes.
pub trait PlaneSink {
    fn write_planes(&mut self, z0: usize, planes: &[f32]) -> Result<()>;
}

/// A whole volume held in memory as a source.
pub struct MemorySource<'a> {
    pub dims: [usize; 3],
    pub data: &'a [f32],
}

impl PlaneSource for MemorySource<'_> {
    fn dims(&self) -> [usize; 3] {
        self.dims
    }
    fn read_planes(&mut self, z0: usize, z1: usize) -> Result<std::borrow::Cow<'_, [f32]>> {
        let p = self.dims[1] * self.dims[2];
        Ok(std::borrow::Cow::Borrowed(&self.data[z0 * p..z1 * p]))
    }
}

/// A sink collecting the whole output in memory.
pub struct MemorySink {
    pub data: Vec<f32>,
}

impl PlaneSink for MemorySink {
    fn write_planes(&mut self, _z0: usize, planes: &[f32]) -> Result<()> {
        self.data.extend_from_slice(planes);
        Ok(())
    }
}
