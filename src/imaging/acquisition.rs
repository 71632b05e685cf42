//! What a raw volume says about how it was acquired: camera offset and gain, read noise,
//! background and photon level, density of structures — what synthetic training pairs
//! must match (`train --like RAW`).
//!
//! Camera model: `raw = offset + gain · (Poisson(λ) + N(0, σ_r²))` (λ photons, σ_r read
//! noise in photons). Noise is measured on the residual `r = v − mean(4 lateral
//! neighbours)`, which removes smooth (blurred) signal; its local mean `m` (5 voxels) is
//! uncorrelated with it. For white noise `Var r = 1.25 κ₂` and `κ₃(r) = 0.9375 κ₃`.
//! - Photon transfer: in bins of `m`, `κ₂ = gain · (m − offset) + gain² σ_r²`, a line
//!   whose slope is the gain (fit over bins holding the darker half of the voxels, where
//!   blurred structure adds little curvature; residuals beyond 6 robust σ dropped).
//! - Offset: the line's intercept mixes offset and read noise; the third cumulant separates
//!   them, since only the Poisson part is skewed: `κ₃ = gain² · (m − offset)`, so each bin
//!   gives `offset = m − κ₃ / gain²` (weighted by its voxel count; the background bins dominate).
//! - Read noise: `σ_r² = (intercept + gain · offset) / gain²`.
//! - Background: the mode of `m`; photons at the background `(background − offset) / gain`.
//! - Density: the fraction of voxels whose local mean lies 5 σ above the background.
//!
//! Voxels equal to all four neighbours are fill (deskew padding, masks), not noise, and are
//! left out of everything.

use super::volume::Volume;
use crate::error::{Error, Result};
use rayon::prelude::*;

/// The estimates (ADU are the raw file's units).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AcquisitionEstimate {
    /// Camera offset (ADU at zero photons).
    pub offset: f64,
    /// ADU per photon.
    pub gain: f64,
    /// Read noise σ in photons.
    pub read_noise: f64,
    /// Background level, ADU (mode of the local means).
    pub background: f64,
    /// Photons per voxel at the background.
    pub background_photons: f64,
    /// Fraction of (non-fill) voxels whose local mean is ≥ 5 σ above the background.
    pub signal_fraction: f64,
    /// Photon-transfer bins: (local mean, residual variance / 1.25, residual κ₃ / 0.9375, voxels).
    pub bins: Vec<(f64, f64, f64, usize)>,
}

/// Voxel-count-weighted least-squares line y = a·x + b.
fn fit_line(pts: &[(f64, f64, f64)]) -> (f64, f64) {
    let sw: f64 = pts.iter().map(|p| p.2).sum();
    let mx = pts.iter().map(|p| p.2 * p.0).sum::<f64>() / sw;
    let my = pts.iter().map(|p| p.2 * p.1).sum::<f64>() / sw;
    let sxy: f64 = pts.iter().map(|p| p.2 * (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| p.2 * (p.0 - mx) * (p.0 - mx)).sum();
    let a = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (a, my - a * mx)
}

/// Estimates the acquisition parameters of `raw` (see the module doc).
pub fn estimate(raw: &Volume) -> Result<AcquisitionEstimate> {
    raw.check_finite("raw volume")?;
    let [nz, ny, nx] = raw.dims;
    if ny < 8 || nx < 8 {
        return Err(Error::invalid(format!(
            "raw volume {} is too small to estimate its noise (needs ≥ 8×8 voxels per plane)",
            raw.shape_str()
        )));
    }
    // (local mean, residual) of every interior voxel
    let pairs: Vec<(f32, f32)> = (0..nz)
        .into_par_iter()
        .flat_map_iter(|z| {
            let p = &raw.data[z * ny * nx..(z + 1) * ny * nx];
            (1..ny - 1).flat_map(move |y| {
                (1..nx - 1).filter_map(move |x| {
                    let c = p[y * nx + x];
                    let n4 = [
                        p[y * nx + x - 1],
                        p[y * nx + x + 1],
                        p[(y - 1) * nx + x],
                        p[(y + 1) * nx + x],
                    ];
                    // five equal values are a fill (deskew padding, clipped or masked regions), not noise
                    if n4.iter().all(|&v| v == c) {
                        return None;
                    }
                    let nb: f32 = n4.iter().sum();
                    Some(((c + nb) / 5.0, c - nb / 4.0))
                })
            })
        })
        .collect();
    if pairs.len() < 1000 {
        return Err(Error::invalid(
            "the raw volume has too few varying voxels for a noise estimate (constant or padded?)",
        ));
    }
    let mut means: Vec<f32> = pairs.iter().map(|p| p.0).collect();
    means.par_sort_unstable_by(|a, b| a.total_cmp(b));
    let q = |f: f64| means[((means.len() - 1) as f64 * f) as usize] as f64;
    // bins of equal voxel count over the darker half: mostly background and the dim side
    // of structures, where blurred edges add little curvature to the residual
    let nbins = 20;
    let edges: Vec<f64> = (0..=nbins).map(|i| q(0.5 * i as f64 / nbins as f64)).collect();
    let bin_of = |m: f64| -> Option<usize> {
        if m < edges[0] || m >= edges[nbins] {
            return None;
        }
        let i = edges.partition_point(|&e| e <= m);
        Some(i.saturating_sub(1).min(nbins - 1))
    };
    let mut members: Vec<Vec<(f32, f32)>> = vec![Vec::new(); nbins];
    for &(m, r) in &pairs {
        if let Some(b) = bin_of(m as f64) {
            members[b].push((m, r));
        }
    }
    // per bin: residuals within 6 robust σ of their median (outliers from structure
    // edges dropped), their variance and third central moment
    let acc: Vec<(f64, f64, f64, f64, usize)> = members
        .par_iter()
        .map(|mb| {
            if mb.len() < 100 {
                return (0.0, 0.0, 0.0, 0.0, 0);
            }
            let mut rs: Vec<f32> = mb.iter().map(|p| p.1).collect();
            let med = super::normalize::percentile(&rs, 50.0).unwrap_or(0.0);
            rs.iter_mut().for_each(|v| *v = (*v as f64 - med).abs() as f32);
            let sd = 1.4826 * super::normalize::percentile(&rs, 50.0).unwrap_or(0.0);
            let kept: Vec<&(f32, f32)> = mb.iter().filter(|p| ((p.1 as f64) - med).abs() < 6.0 * sd).collect();
            let n = kept.len() as f64;
            let mean_m = kept.iter().map(|p| p.0 as f64).sum::<f64>() / n;
            let mean_r = kept.iter().map(|p| p.1 as f64).sum::<f64>() / n;
            let (m2, m3) = kept.iter().fold((0.0, 0.0), |(a, b), p| {
                let d = p.1 as f64 - mean_r;
                (a + d * d, b + d * d * d)
            });
            (mean_m * n, 0.0, m2, m3, kept.len())
        })
        .collect();
    let bins: Vec<(f64, f64, f64, usize)> = acc
        .iter()
        .filter(|a| a.4 >= 100)
        .map(|a| {
            let n = a.4 as f64;
            (a.0 / n, a.2 / n / 1.25, a.3 / n / 0.9375, a.4)
        })
        .collect();
    if bins.len() < 3 || edges[nbins] - edges[0] <= 0.0 {
        return Err(Error::invalid(
            "the raw volume has too narrow a range of intensities for a photon-transfer fit (is it raw camera data?)",
        ));
    }
    let (gain, intercept) = fit_line(&bins.iter().map(|b| (b.0, b.1, b.3 as f64)).collect::<Vec<_>>());
    if !(gain > 0.0 && gain.is_finite()) {
        return Err(Error::invalid(format!(
            "the noise does not grow with intensity (photon-transfer slope {gain:.3e}): not raw photon-counting data? \
             (denoised, or already processed)"
        )));
    }
    let (wsum, osum) = bins.iter().fold((0.0, 0.0), |(w, o), b| {
        (w + b.3 as f64, o + b.3 as f64 * (b.0 - b.2 / (gain * gain)))
    });
    let offset = osum / wsum;
    let read_noise = ((intercept + gain * offset) / (gain * gain)).max(0.0).sqrt();
    // background: mode of the local means (histogram over the darker half, 3-bin smoothing)
    let (lo, hi) = (edges[0], edges[nbins]);
    let nh = 256;
    let mut hist = vec![0usize; nh];
    for &m in &means {
        let m = m as f64;
        if m >= lo && m < hi {
            hist[(((m - lo) / (hi - lo)) * nh as f64) as usize] += 1;
        }
    }
    let smooth = |i: usize| hist[i.saturating_sub(1)..(i + 2).min(nh)].iter().sum::<usize>();
    let imode = (0..nh).max_by_key(|&i| smooth(i)).unwrap_or(0);
    let background = lo + (imode as f64 + 0.5) / nh as f64 * (hi - lo);
    let background_photons = (background - offset) / gain;
    // σ of a 5-voxel mean at the background
    let sigma_m = ((gain * (background - offset) + gain * gain * read_noise * read_noise).max(0.0) / 5.0).sqrt();
    let thr = background + 5.0 * sigma_m;
    let above = means.len() - means.partition_point(|&m| (m as f64) < thr);
    let est = AcquisitionEstimate {
        offset,
        gain,
        read_noise,
        background,
        background_photons,
        signal_fraction: above as f64 / means.len() as f64,
        bins,
    };
    if ![est.offset, est.gain, est.read_noise, est.background]
        .iter()
        .all(|v| v.is_finite())
    {
        return Err(Error::invalid(
            "the noise estimate is not finite (constant or degenerate volume?)",
        ));
    }
    Ok(est)
}
