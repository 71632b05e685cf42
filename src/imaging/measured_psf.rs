//! Measured PSFs (bead stacks, instrument PSFs) cleaned the way deconvolution needs them:
//! per-plane background, a noise floor of k·σ of that background, the support (the
//! voxels above the floor connected to the peak), sub-voxel centring, resampling to the
//! data's voxel size, optional radial averaging, crop to the support, sum 1.
//!
//! Why each step: a measured stack's noise floor is spread over the whole field, so
//! without a floor most of the PSF's mass lies far from the bead (68% beyond 20 px on
//! pycudadecon's LLS PSF) and RL treats it as real blur; a higher background on one plane
//! (common on the first plane of a stack) leaves a "ghost plane" in the PSF and a dark band
//! in every result; a PSF stepped at 0.1 µm used on data stepped at 0.3 µm is 3× too
//! long axially. cudaDecon handles the same problems in the OTF (radial average, origin
//! fix, interpolation onto the data's frequency grid); here they are handled in space so
//! the result is an ordinary PSF file every command can read.

use super::psf::{fwhm_voxels, normalize_sum};
use super::volume::{dims_str, Volume};
use crate::error::{Error, Result};
use std::collections::VecDeque;

/// Where the PSF's centre is taken to be (the voxel that lands on the output's centre).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CentreRule {
    /// Intensity centroid of the voxels above 10% of the peak (robust on noisy beads).
    #[default]
    Centroid,
    /// The brightest voxel refined by a parabola through it and its two neighbours on each
    /// axis (cudaDecon's rule).
    Peak,
}

/// How to clean a measured bead image.
#[derive(Clone, Debug)]
pub struct MeasuredOptions {
    /// One background for the whole stack; None: each plane's own (median of its border).
    pub background: Option<f32>,
    /// Noise floor in units of the background's σ (robust, from the plane borders):
    /// voxels below it, and voxels above it not connected to the peak, are set to 0.
    /// 0 keeps everything above the background.
    pub noise_floor_sigmas: f64,
    /// Average over rings around the optical (z) axis: an axially symmetric PSF (as
    /// cudaDecon's radial OTF).
    pub radial: bool,
    pub centre: CentreRule,
    /// Added to the centre's z, in the bead's planes (sub-voxel moves of the PSF along z).
    /// cudaDecon's radialft (pycudadecon 0.5.1) centres its OTF 0.6 planes past the
    /// parabola-fitted peak; 0.6 with `CentreRule::Peak` matches it.
    pub z_centre_offset: f64,
    /// Output size (z, y, x), odd; None: the support's extent (made odd).
    pub crop: Option<[usize; 3]>,
    /// The bead stack's voxel size when the file has none, µm.
    pub voxel_size: Option<[f64; 3]>,
    /// Voxel size of the data the PSF is for, µm: the PSF is resampled to it (linear
    /// interpolation). None: keep the bead's sampling.
    pub target_voxel_size: Option<[f64; 3]>,
    /// Name of the source file, recorded in the metadata.
    pub source: Option<String>,
}

impl Default for MeasuredOptions {
    fn default() -> Self {
        MeasuredOptions {
            background: None,
            noise_floor_sigmas: 3.0,
            radial: false,
            centre: CentreRule::Centroid,
            z_centre_offset: 0.0,
            crop: None,
            voxel_size: None,
            target_voxel_size: None,
            source: None,
        }
    }
}

/// What cleaning found and did (also recorded in the PSF's metadata).
#[derive(Clone, Debug, serde::Serialize)]
pub struct MeasuredReport {
    pub input_shape: [usize; 3],
    /// Background subtracted from each plane.
    pub plane_background: Vec<f32>,
    /// Robust σ of the background (1.4826 × MAD of the plane borders).
    pub noise_sigma: f64,
    pub noise_floor: f64,
    /// Voxels in the support.
    pub support_voxels: usize,
    /// Fraction of the background-subtracted (positive) mass outside the support: the
    /// noise floor and stray light removed.
    pub mass_outside_support: f64,
    /// Fraction of the positive mass beyond 20 voxels of the peak, before and after cleaning.
    pub mass_beyond_20px_before: f64,
    pub mass_beyond_20px_after: f64,
    /// Share of the PSF's mass on the first or last plane (the larger), before (one
    /// background for the whole stack) and after cleaning: a ghost plane shows here.
    pub edge_plane_mass_before: f64,
    pub edge_plane_mass_after: f64,
    /// The centre (z, y, x) in the bead's voxels.
    pub centre_zyx: [f64; 3],
    pub source_voxel_size: Option<[f64; 3]>,
    pub output_voxel_size: Option<[f64; 3]>,
    /// FWHM (z, y, x) of the result in voxels of the output.
    pub fwhm_voxels: [f64; 3],
}

/// Cleans a measured PSF (see the module doc); returns the PSF (sum 1, centre at dims/2)
/// and what was done.
pub fn clean_measured(bead: &Volume, opts: &MeasuredOptions) -> Result<(Volume, MeasuredReport)> {
    bead.check_finite("measured PSF")?;
    let [nz, ny, nx] = bead.dims;
    if bead.dims.iter().any(|&d| d < 3) {
        return Err(Error::invalid(format!(
            "measured PSF {} is too small (needs ≥ 3 voxels per axis)",
            bead.shape_str()
        )));
    }
    if !(opts.noise_floor_sigmas.is_finite() && opts.noise_floor_sigmas >= 0.0) {
        return Err(Error::invalid(format!(
            "noise floor must be ≥ 0 background σ (got {})",
            opts.noise_floor_sigmas
        )));
    }
    if let Some(c) = opts.crop {
        if c.iter().any(|&d| d == 0 || d % 2 == 0) {
            return Err(Error::invalid(format!(
                "crop size {} must be odd on every axis",
                dims_str(c)
            )));
        }
    }
    let src_vs = bead.voxel_size.or(opts.voxel_size);
    if let Some(t) = opts.target_voxel_size {
        if t.iter().any(|&v| !(v.is_finite() && v > 0.0)) {
            return Err(Error::invalid("target voxel size must be positive"));
        }
        if src_vs.is_none() {
            return Err(Error::invalid(
                "to resample the PSF to the data's voxel size, the PSF's own voxel size is needed: \
                 the file has none, give it (--psf-dz/--psf-dxy)",
            ));
        }
    }
    let plane = ny * nx;
    // the border ring of each plane (≥ 2 px, ~5% of the side) measures background and noise
    let ring = (ny.min(nx) / 20).clamp(2, (ny.min(nx) - 1) / 2 + 1);
    let border = |z: usize| -> Vec<f32> {
        let mut v = Vec::new();
        for y in 0..ny {
            for x in 0..nx {
                if y < ring || x < ring || y + ring >= ny || x + ring >= nx {
                    v.push(bead.data[z * plane + y * nx + x]);
                }
            }
        }
        v
    };
    let median = |v: &[f32]| super::normalize::percentile(v, 50.0);
    let mut plane_bg = Vec::with_capacity(nz);
    let mut all_border = Vec::new();
    for z in 0..nz {
        let b = border(z);
        let m = median(&b)? as f32;
        plane_bg.push(opts.background.unwrap_or(m));
        all_border.extend(b.iter().map(|&v| v - m));
    }
    // robust σ from the plane borders (each about its own median)
    let abs: Vec<f32> = all_border.iter().map(|v| v.abs()).collect();
    let noise_sigma = 1.4826 * median(&abs)?;
    let floor = opts.noise_floor_sigmas * noise_sigma;
    let sub: Vec<f32> = bead
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| v - plane_bg[i / plane])
        .collect();
    let (ipk, &peak) = sub
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .expect("non-empty");
    if !(peak as f64 > floor && peak > 0.0) {
        return Err(Error::invalid(format!(
            "measured PSF has nothing above its noise floor (peak {peak:.3} above background, floor {floor:.3}); \
             lower --noise-floor or check the file"
        )));
    }
    let pk = [ipk / plane, (ipk / nx) % ny, ipk % nx];
    // support: above the floor and 26-connected to the peak (isolated noise spikes drop out)
    let mut support = vec![false; sub.len()];
    support[ipk] = true;
    let mut queue = VecDeque::from([pk]);
    while let Some([z, y, x]) = queue.pop_front() {
        for dz in -1i64..=1 {
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (zz, yy, xx) = (z as i64 + dz, y as i64 + dy, x as i64 + dx);
                    if zz < 0 || yy < 0 || xx < 0 || zz >= nz as i64 || yy >= ny as i64 || xx >= nx as i64 {
                        continue;
                    }
                    let j = (zz as usize * ny + yy as usize) * nx + xx as usize;
                    if !support[j] && sub[j] as f64 > floor.max(0.0) {
                        support[j] = true;
                        queue.push_back([zz as usize, yy as usize, xx as usize]);
                    }
                }
            }
        }
    }
    let positive_mass: f64 = sub.iter().map(|&v| v.max(0.0) as f64).sum();
    let cleaned: Vec<f32> = sub
        .iter()
        .zip(&support)
        .map(|(&v, &s)| if s { v.max(0.0) } else { 0.0 })
        .collect();
    let kept: f64 = cleaned.iter().map(|&v| v as f64).sum();
    let support_voxels = support.iter().filter(|&&s| s).count();

    // the "before" facts, with one background for the whole stack (what a plain clean does)
    let global_bg = median(&plane_bg)? as f32;
    let before: Vec<f32> = bead.data.iter().map(|&v| (v - global_bg).max(0.0)).collect();
    if !opts.z_centre_offset.is_finite() {
        return Err(Error::invalid("the z centre offset must be a finite number of planes"));
    }
    let mut centre = match opts.centre {
        CentreRule::Centroid => core_centroid(&cleaned, bead.dims, peak),
        CentreRule::Peak => parabola_peak(&sub, bead.dims, pk),
    };
    centre[0] += opts.z_centre_offset;
    let beyond = |d: &[f32]| mass_beyond(d, bead.dims, centre, 20.0);
    let edge_plane = |d: &[f32]| edge_plane_share(d, bead.dims);

    // sampling of the output on the bead's grid: step (in bead voxels) and size
    let step = match (opts.target_voxel_size, src_vs) {
        (Some(t), Some(s)) => [t[0] / s[0], t[1] / s[1], t[2] / s[2]],
        _ => [1.0; 3],
    };
    let out_dims = match opts.crop {
        Some(c) => c,
        None => {
            // the support's extent about the centre, in output voxels, odd
            let mut ext = [0.0f64; 3];
            for (i, _) in cleaned.iter().enumerate().filter(|(_, &v)| v > 0.0) {
                let p = [i / plane, (i / nx) % ny, i % nx];
                for a in 0..3 {
                    ext[a] = ext[a].max((p[a] as f64 - centre[a]).abs());
                }
            }
            [0, 1, 2].map(|a| 2 * ((ext[a] / step[a]).ceil() as usize + 1) + 1)
        }
    };
    let half = out_dims.map(|d| (d / 2) as f64);
    let mut data = Vec::with_capacity(out_dims.iter().product());
    for z in 0..out_dims[0] {
        for y in 0..out_dims[1] {
            for x in 0..out_dims[2] {
                data.push(trilinear(
                    &cleaned,
                    bead.dims,
                    [
                        centre[0] + (z as f64 - half[0]) * step[0],
                        centre[1] + (y as f64 - half[1]) * step[1],
                        centre[2] + (x as f64 - half[2]) * step[2],
                    ],
                ) as f32);
            }
        }
    }
    let mut psf = Volume::new(out_dims, data)?;
    if opts.radial {
        radial_average(&mut psf);
    }
    normalize_sum(&mut psf)?;
    psf.voxel_size = match (opts.target_voxel_size, src_vs) {
        (Some(t), Some(_)) => Some(t),
        _ => src_vs,
    };
    let report = MeasuredReport {
        input_shape: bead.dims,
        plane_background: plane_bg,
        noise_sigma,
        noise_floor: floor,
        support_voxels,
        mass_outside_support: 1.0 - kept / positive_mass.max(f64::MIN_POSITIVE),
        mass_beyond_20px_before: beyond(&before),
        mass_beyond_20px_after: beyond(&cleaned),
        edge_plane_mass_before: edge_plane(&before),
        edge_plane_mass_after: edge_plane(&cleaned),
        centre_zyx: centre,
        source_voxel_size: src_vs,
        output_voxel_size: psf.voxel_size,
        fwhm_voxels: fwhm_voxels(&psf),
    };
    psf.metadata = Some(
        serde_json::json!({
            "model": "measured",
            "source": opts.source,
            "background": report.plane_background.iter().map(|&v| v as f64).sum::<f64>() / nz as f64,
            "noise_floor": floor,
            "noise_floor_sigmas": opts.noise_floor_sigmas,
            "radial": opts.radial,
            "centre_rule": opts.centre,
            "centroid_zyx": centre,
            "z_centre_offset": opts.z_centre_offset,
            "input_shape": bead.dims,
            "source_voxel_size": src_vs,
            "resampling": if step != [1.0; 3] { "linear" } else { "none" },
        })
        .to_string(),
    );
    Ok((psf, report))
}

/// Trilinear interpolation of `v` (dims `d`) at `p` (voxels); 0 outside.
fn trilinear(v: &[f32], d: [usize; 3], p: [f64; 3]) -> f64 {
    let f = p.map(|c| c - c.floor());
    let o = p.map(|c| c.floor() as i64);
    let mut acc = 0.0;
    for (dz, wz) in [(0, 1.0 - f[0]), (1, f[0])] {
        for (dy, wy) in [(0, 1.0 - f[1]), (1, f[1])] {
            for (dx, wx) in [(0, 1.0 - f[2]), (1, f[2])] {
                let (z, y, x) = (o[0] + dz, o[1] + dy, o[2] + dx);
                if z >= 0 && y >= 0 && x >= 0 && (z as usize) < d[0] && (y as usize) < d[1] && (x as usize) < d[2] {
                    acc += wz * wy * wx * v[(z as usize * d[1] + y as usize) * d[2] + x as usize] as f64;
                }
            }
        }
    }
    acc
}

/// Centroid of the voxels at or above 10% of the peak.
fn core_centroid(v: &[f32], d: [usize; 3], peak: f32) -> [f64; 3] {
    let (mut sw, mut c) = (0.0f64, [0.0f64; 3]);
    for (i, &w) in v.iter().enumerate() {
        if w >= 0.1 * peak {
            let p = [i / (d[1] * d[2]), (i / d[2]) % d[1], i % d[2]];
            sw += w as f64;
            for a in 0..3 {
                c[a] += w as f64 * p[a] as f64;
            }
        }
    }
    c.map(|x| x / sw)
}

/// The peak voxel refined on each axis by the vertex of the parabola through it and its
/// neighbours (clamped to ±0.5 voxel; no refinement at an edge).
fn parabola_peak(v: &[f32], d: [usize; 3], pk: [usize; 3]) -> [f64; 3] {
    let at = |p: [usize; 3]| v[(p[0] * d[1] + p[1]) * d[2] + p[2]] as f64;
    let mut c = pk.map(|x| x as f64);
    for a in 0..3 {
        if pk[a] == 0 || pk[a] + 1 >= d[a] {
            continue;
        }
        let (mut lo, mut hi) = (pk, pk);
        lo[a] -= 1;
        hi[a] += 1;
        let (m, z0, p) = (at(lo), at(pk), at(hi));
        let den = m - 2.0 * z0 + p;
        if den < 0.0 {
            c[a] += (0.5 * (m - p) / den).clamp(-0.5, 0.5);
        }
    }
    c
}

fn mass_beyond(v: &[f32], d: [usize; 3], c: [f64; 3], r: f64) -> f64 {
    let (mut all, mut far) = (0.0f64, 0.0f64);
    for (i, &w) in v.iter().enumerate() {
        let p = [i / (d[1] * d[2]), (i / d[2]) % d[1], i % d[2]];
        let d2: f64 = (0..3).map(|a| (p[a] as f64 - c[a]).powi(2)).sum();
        all += w as f64;
        if d2 > r * r {
            far += w as f64;
        }
    }
    far / all.max(f64::MIN_POSITIVE)
}

fn edge_plane_share(v: &[f32], d: [usize; 3]) -> f64 {
    let plane = d[1] * d[2];
    let total: f64 = v.iter().map(|&w| w as f64).sum();
    let sum = |z: usize| v[z * plane..(z + 1) * plane].iter().map(|&w| w as f64).sum::<f64>();
    sum(0).max(sum(d[0] - 1)) / total.max(f64::MIN_POSITIVE)
}

/// Replaces each plane by its average over rings about the centre axis (y, x = dims/2):
/// profiles in 1-voxel radial bins with linear weights, read back by linear interpolation.
fn radial_average(v: &mut Volume) {
    let [nz, ny, nx] = v.dims;
    let (cy, cx) = ((ny / 2) as f64, (nx / 2) as f64);
    let nr = ((cy * cy + cx * cx).sqrt().ceil() as usize) + 2;
    let radius = |y: usize, x: usize| ((y as f64 - cy).powi(2) + (x as f64 - cx).powi(2)).sqrt();
    for z in 0..nz {
        let p = &mut v.data[z * ny * nx..(z + 1) * ny * nx];
        let (mut sum, mut wt) = (vec![0.0f64; nr], vec![0.0f64; nr]);
        for y in 0..ny {
            for x in 0..nx {
                let r = radius(y, x);
                let (r0, f) = (r.floor() as usize, r - r.floor());
                let val = p[y * nx + x] as f64;
                sum[r0] += (1.0 - f) * val;
                wt[r0] += 1.0 - f;
                sum[r0 + 1] += f * val;
                wt[r0 + 1] += f;
            }
        }
        let prof: Vec<f64> = sum
            .iter()
            .zip(&wt)
            .map(|(s, w)| if *w > 0.0 { s / w } else { 0.0 })
            .collect();
        for y in 0..ny {
            for x in 0..nx {
                let r = radius(y, x);
                let (r0, f) = (r.floor() as usize, r - r.floor());
                p[y * nx + x] = (prof[r0] * (1.0 - f) + prof[r0 + 1] * f) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A noiseless Gaussian bead on a zero background (floor 0: everything above it kept).
    fn bead(dims: [usize; 3], centre: [f64; 3], sigma: [f64; 3]) -> Volume {
        crate::imaging::radial_otf::tests::gaussian_bead(dims, centre, sigma, 0.0)
    }

    /// The z centre offset moves the PSF along z: by one plane it is the unmoved PSF one
    /// plane lower (the same voxels sampled), by half a plane its z centroid is half a
    /// plane lower (linear interpolation between Gaussian samples: within 0.02 plane).
    #[test]
    fn z_centre_offset_moves_the_psf_along_z() {
        let b = bead([31, 21, 21], [15.0, 10.0, 10.0], [3.0, 1.5, 1.5]);
        let clean = |off: f64| {
            clean_measured(
                &b,
                &MeasuredOptions {
                    background: Some(0.0),
                    noise_floor_sigmas: 0.0,
                    centre: CentreRule::Peak,
                    z_centre_offset: off,
                    crop: Some([25, 15, 15]),
                    ..Default::default()
                },
            )
            .unwrap()
            .0
        };
        let (p0, p1, ph) = (clean(0.0), clean(1.0), clean(0.5));
        let peak = p0.data.iter().cloned().fold(0.0f32, f32::max);
        let mut worst = 0.0f32;
        for z in 0..24 {
            for y in 0..15 {
                for x in 0..15 {
                    worst = worst.max((p1.at(z, y, x) - p0.at(z + 1, y, x)).abs());
                }
            }
        }
        assert!(worst < 1e-3 * peak, "{}", worst / peak);
        let zc = |p: &Volume| {
            let plane = 15 * 15;
            p.data
                .iter()
                .enumerate()
                .map(|(i, &v)| (i / plane) as f64 * v as f64)
                .sum::<f64>()
                / p.sum()
        };
        assert!((zc(&p0) - 12.0).abs() < 1e-3, "{}", zc(&p0));
        assert!((zc(&ph) - 11.5).abs() < 0.02, "{}", zc(&ph));
        let bad = MeasuredOptions {
            z_centre_offset: f64::NAN,
            ..Default::default()
        };
        assert!(clean_measured(&b, &bad).is_err());
    }
}
