//! Image-quality metrics of a prediction against a ground truth: PSNR, SSIM, NRMSE,
//! Pearson r.
//!
//! SSIM is scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
//! use_sample_covariance=False, data_range=R)` in 3D: Gaussian window σ = 1.5 truncated
//! at 3.5σ (11 taps per axis), scipy's 'reflect' edges, K1 = 0.01, K2 = 0.03, and the
//! mean of the SSIM map without its 5-voxel border. Everything is computed in f64.

use super::normalize::{normalize_percentile, P_HI, P_LO};
use super::volume::Volume;
use crate::error::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How the two volumes are brought to one scale before comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// Compare the raw values.
    None,
    /// Both percentile-normalized (0.01 / 99.5, rln-spec.md §6).
    Percentile,
    /// Ground truth percentile-normalized, prediction mapped onto it by the least-squares
    /// scale and offset (as CARE evaluates).
    Affine,
}

impl std::str::FromStr for Normalize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Normalize::None),
            "percentile" => Ok(Normalize::Percentile),
            "affine" => Ok(Normalize::Affine),
            _ => Err(Error::invalid(format!(
                "unknown normalization {s:?}: none, percentile or affine"
            ))),
        }
    }
}

/// The metrics of one comparison.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metrics {
    pub psnr: f64,
    pub ssim: f64,
    pub nrmse: f64,
    pub pearson_r: f64,
    /// The data range R used by PSNR and SSIM.
    pub data_range: f64,
    pub normalize: Normalize,
    /// Scale and offset applied to the prediction (affine mode).
    pub affine: Option<[f64; 2]>,
    pub shape: [usize; 3],
}

/// Compares `pred` with `gt` after `normalize`; `data_range` None: max − min of the
/// (normalized) ground truth.
pub fn evaluate(gt: &Volume, pred: &Volume, normalize: Normalize, data_range: Option<f64>) -> Result<Metrics> {
    if gt.dims != pred.dims {
        return Err(Error::Shape(format!(
            "ground truth is {} but prediction is {}; compare volumes of one size",
            gt.shape_str(),
            pred.shape_str()
        )));
    }
    gt.check_finite("ground truth")?;
    pred.check_finite("prediction")?;
    let (g, p, affine): (Vec<f32>, Vec<f32>, Option<[f64; 2]>) = match normalize {
        Normalize::None => (gt.data.clone(), pred.data.clone(), None),
        Normalize::Percentile => (
            normalize_percentile(&gt.data, P_LO, P_HI)?,
            normalize_percentile(&pred.data, P_LO, P_HI)?,
            None,
        ),
        Normalize::Affine => {
            let g = normalize_percentile(&gt.data, P_LO, P_HI)?;
            let (a, b) = fit_affine(&pred.data, &g);
            let p = pred.data.iter().map(|&v| (a * v as f64 + b) as f32).collect();
            (g, p, Some([a, b]))
        }
    };
    let r = match data_range {
        Some(r) if r > 0.0 && r.is_finite() => r,
        Some(r) => return Err(Error::invalid(format!("data range must be positive (got {r})"))),
        None => {
            let (lo, hi) = g
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
            let r = (hi - lo) as f64;
            if !(r > 0.0) {
                return Err(Error::invalid("ground truth is constant: give --data-range"));
            }
            r
        }
    };
    Ok(Metrics {
        psnr: psnr(&g, &p, r),
        ssim: ssim(gt.dims, &g, &p, r)?,
        nrmse: nrmse(&g, &p),
        pearson_r: pearson(&g, &p),
        data_range: r,
        normalize,
        affine,
        shape: gt.dims,
    })
}

/// Least-squares `(a, b)` minimizing ‖a·x + b − y‖².
pub fn fit_affine(x: &[f32], y: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let mx = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let my = y.iter().map(|&v| v as f64).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (da, db) = (a as f64 - mx, b as f64 - my);
        sxy += da * db;
        sxx += da * da;
    }
    let a = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (a, my - a * mx)
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.par_iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64
}

/// 10·log10(R² / MSE) (scikit-image's peak_signal_noise_ratio).
pub fn psnr(gt: &[f32], pred: &[f32], data_range: f64) -> f64 {
    10.0 * (data_range * data_range / mse(gt, pred)).log10()
}

/// ‖gt − pred‖ / ‖gt‖ (scikit-image's normalized_root_mse, 'euclidean').
pub fn nrmse(gt: &[f32], pred: &[f32]) -> f64 {
    let den = gt.par_iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / gt.len() as f64;
    (mse(gt, pred) / den).sqrt()
}

/// Pearson correlation coefficient.
pub fn pearson(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let ma = a.iter().map(|&v| v as f64).sum::<f64>() / n;
    let mb = b.iter().map(|&v| v as f64).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

const SSIM_SIGMA: f64 = 1.5;
const SSIM_TRUNCATE: f64 = 3.5;

/// scipy.ndimage's normalized Gaussian taps for σ and truncate.
fn gaussian_taps(sigma: f64, truncate: f64) -> Vec<f64> {
    let r = (truncate * sigma + 0.5) as i64;
    let w: Vec<f64> = (-r..=r)
        .map(|x| (-0.5 / (sigma * sigma) * (x * x) as f64).exp())
        .collect();
    let s: f64 = w.iter().sum();
    w.iter().map(|v| v / s).collect()
}

/// Index `i` folded into 0..n the way scipy.ndimage's 'reflect' mode does
/// (d c b a | a b c d | d c b a); the Gaussian windows of SSIM and of the synthetic
/// blur both use it.
pub(crate) fn reflect(i: i64, n: i64) -> usize {
    let mut i = i;
    if n == 1 {
        return 0;
    }
    loop {
        if i < 0 {
            i = -i - 1;
        } else if i >= n {
            i = 2 * n - i - 1;
        } else {
            return i as usize;
        }
    }
}

/// Separable Gaussian filter (scipy gaussian_filter, mode 'reflect') in f64.
fn gaussian_filter(dims: [usize; 3], v: &[f64], taps: &[f64]) -> Vec<f64> {
    let [nz, ny, nx] = dims;
    let r = (taps.len() / 2) as i64;
    let mut cur = v.to_vec();
    for axis in 0..3 {
        let n = dims[axis] as i64;
        let stride = [ny * nx, nx, 1][axis];
        let src = cur;
        let mut out = vec![0.0f64; src.len()];
        out.par_chunks_mut(ny * nx).enumerate().for_each(|(z, plane)| {
            for y in 0..ny {
                for x in 0..nx {
                    let pos = [z, y, x][axis] as i64;
                    let base = (z * ny + y) * nx + x - pos as usize * stride;
                    let mut acc = 0.0;
                    for (t, &w) in taps.iter().enumerate() {
                        acc += w * src[base + reflect(pos + t as i64 - r, n) * stride];
                    }
                    plane[y * nx + x] = acc;
                }
            }
        });
        cur = out;
        let _ = nz;
    }
    cur
}

/// Mean SSIM of two volumes of shape `dims` (scikit-image's Gaussian-window SSIM).
pub fn ssim(dims: [usize; 3], a: &[f32], b: &[f32], data_range: f64) -> Result<f64> {
    let taps = gaussian_taps(SSIM_SIGMA, SSIM_TRUNCATE);
    let win = taps.len();
    if dims.iter().any(|&d| d < win) {
        return Err(Error::invalid(format!(
            "SSIM needs at least {win} voxels along every axis (volume is {}×{}×{})",
            dims[0], dims[1], dims[2]
        )));
    }
    let x: Vec<f64> = a.iter().map(|&v| v as f64).collect();
    let y: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    let ux = gaussian_filter(dims, &x, &taps);
    let uy = gaussian_filter(dims, &y, &taps);
    let uxx = gaussian_filter(dims, &x.iter().map(|v| v * v).collect::<Vec<_>>(), &taps);
    let uyy = gaussian_filter(dims, &y.iter().map(|v| v * v).collect::<Vec<_>>(), &taps);
    let uxy = gaussian_filter(dims, &x.iter().zip(&y).map(|(p, q)| p * q).collect::<Vec<_>>(), &taps);
    let c1 = (0.01 * data_range).powi(2);
    let c2 = (0.03 * data_range).powi(2);
    let pad = (win - 1) / 2;
    let [nz, ny, nx] = dims;
    let mut sum = 0.0;
    let mut count = 0usize;
    for z in pad..nz - pad {
        for yy in pad..ny - pad {
            for xx in pad..nx - pad {
                let i = (z * ny + yy) * nx + xx;
                let (mx, my) = (ux[i], uy[i]);
                let vx = uxx[i] - mx * mx;
                let vy = uyy[i] - my * my;
                let vxy = uxy[i] - mx * my;
                sum += ((2.0 * mx * my + c1) * (2.0 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2));
                count += 1;
            }
        }
    }
    Ok(sum / count as f64)
}
