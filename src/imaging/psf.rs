//! Point spread functions: Gaussian, Gibson–Lanni scalar widefield (as formulated by
//! Aguet et al., Opt. Express 17, 6829 (2009), with the parameters of the `psfmodels`
//! package), confocal (excitation × pinhole-filtered emission), and cleaned measured beads.
//!
//! Every PSF sums to 1, carries its voxel size, and records its [`PsfSpec`] as JSON in
//! `Volume::metadata`; [`generate`] is deterministic, so a stored spec regenerates the
//! identical PSF (`PsfSpec::from_metadata` + `generate`).

use super::volume::Volume;
use crate::error::{Error, Result};
use rayon::prelude::*;
use rustfft::num_complex::Complex64;
use serde::{Deserialize, Serialize};

/// FWHM = this × σ for a Gaussian.
pub const FWHM_PER_SIGMA: f64 = 2.354_820_045_030_949_3;

/// Everything needed to regenerate a model PSF.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "kebab-case")]
pub enum PsfSpec {
    Gaussian(GaussianPsf),
    GibsonLanni(GibsonLanni),
    Confocal(ConfocalPsf),
}

/// A sampled 3D Gaussian (values at voxel centers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GaussianPsf {
    /// Full width at half maximum (z, y, x), µm.
    pub fwhm: [f64; 3],
    /// Voxel size (z, y, x), µm.
    pub voxel_size: [f64; 3],
    /// Size (z, y, x) in voxels.
    pub shape: [usize; 3],
}

impl GaussianPsf {
    /// A Gaussian with FWHM `fwhm` (µm); `shape` None: odd, ±4σ on each axis.
    pub fn from_fwhm(fwhm: [f64; 3], voxel_size: [f64; 3], shape: Option<[usize; 3]>) -> Self {
        let shape = shape.unwrap_or_else(|| {
            let mut s = [0; 3];
            for a in 0..3 {
                let sig = fwhm[a] / FWHM_PER_SIGMA / voxel_size[a];
                s[a] = 2 * ((4.0 * sig).ceil().max(1.0) as usize) + 1;
            }
            s
        });
        GaussianPsf {
            fwhm,
            voxel_size,
            shape,
        }
    }

    /// The widefield Gaussian approximation of Zhang, Zerubia & Olivo-Marin, Appl. Opt.
    /// 46, 1819 (2007) (paraxial below NA 0.7, non-paraxial above), for emission
    /// wavelength `wavelength` (µm) and immersion index `ni` — the same formulas as
    /// `psfmodels`' gaussian model.
    pub fn from_optics(
        na: f64,
        wavelength: f64,
        ni: f64,
        voxel_size: [f64; 3],
        shape: Option<[usize; 3]>,
    ) -> Result<Self> {
        if !(na > 0.0 && na < ni && wavelength > 0.0) {
            return Err(Error::invalid(format!(
                "need 0 < NA < ni and wavelength > 0 (NA {na}, ni {ni}, λ {wavelength})"
            )));
        }
        let k = 2.0 * std::f64::consts::PI / wavelength;
        let (sxy, sz) = if na < 0.7 {
            ((2f64).sqrt() / (k * na), 2.0 * (6f64).sqrt() * ni / (k * na * na))
        } else {
            let ca = (na / ni).asin().cos();
            let c15 = ca.powf(1.5);
            let c35 = ca.powf(3.5);
            let sxy = ((4.0 - 7.0 * c15 + 3.0 * c35) / (7.0 * (1.0 - c15))).powf(-0.5) / (ni * k);
            let d = 4.0 * ca.powi(5) - 25.0 * c35 + 42.0 * ca.powf(2.5) - 25.0 * c15 + 4.0;
            let sz = 5.0 * (7f64).sqrt() * (1.0 - c15) / ((6f64).sqrt() * ni * k * d.sqrt());
            (sxy, sz)
        };
        Ok(Self::from_fwhm(
            [sz * FWHM_PER_SIGMA, sxy * FWHM_PER_SIGMA, sxy * FWHM_PER_SIGMA],
            voxel_size,
            shape,
        ))
    }
}

/// Gibson–Lanni scalar widefield PSF; names, units (µm) and defaults of `psfmodels.make_psf`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GibsonLanni {
    /// Numerical aperture.
    pub na: f64,
    /// Emission wavelength, µm.
    pub wavelength: f64,
    /// Sample refractive index.
    pub ns: f64,
    /// Immersion medium index, actual / design.
    pub ni: f64,
    pub ni0: f64,
    /// Coverslip index, actual / design.
    pub ng: f64,
    pub ng0: f64,
    /// Coverslip thickness, actual / design, µm.
    pub tg: f64,
    pub tg0: f64,
    /// Working distance (immersion thickness), design, µm.
    pub ti0: f64,
    /// Depth of the point source above the coverslip, µm.
    pub pz: f64,
    /// Lateral and axial voxel size, µm.
    pub dxy: f64,
    pub dz: f64,
    /// Lateral size (nx × nx) and number of planes.
    pub nx: usize,
    pub nz: usize,
    /// Sub-pixels per pixel and axis averaged to approximate pixel integration (1: point samples).
    pub oversample: usize,
}

impl Default for GibsonLanni {
    fn default() -> Self {
        GibsonLanni {
            na: 1.4,
            wavelength: 0.6,
            ns: 1.47,
            ni: 1.515,
            ni0: 1.515,
            ng: 1.515,
            ng0: 1.515,
            tg: 170.0,
            tg0: 170.0,
            ti0: 150.0,
            pz: 0.0,
            dxy: 0.05,
            dz: 0.05,
            nx: 51,
            nz: 51,
            oversample: 3,
        }
    }
}

/// Confocal PSF: excitation PSF × (emission PSF ⊛ pinhole disk) per plane.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfocalPsf {
    /// Objective, sample and sampling; `optics.wavelength` is the emission wavelength.
    pub optics: GibsonLanni,
    /// Excitation wavelength, µm.
    pub ex_wavelength: f64,
    /// Pinhole diameter in Airy units (1 AU = 1.22 λ_em / NA); 0: ideal point pinhole;
    /// ≥ 50: open pinhole (excitation PSF only), as psfmodels.
    pub pinhole_au: f64,
}

impl PsfSpec {
    /// The spec stored in a PSF's (or model's) metadata JSON.
    pub fn from_metadata(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| Error::invalid(format!("not a PSF spec: {e}")))
    }
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("PsfSpec serializes")
    }
}

/// Computes the PSF a spec describes (sum 1, voxel size set, spec JSON in metadata).
pub fn generate(spec: &PsfSpec) -> Result<Volume> {
    let mut v = match spec {
        PsfSpec::Gaussian(g) => gaussian(g)?,
        PsfSpec::GibsonLanni(p) => gibson_lanni(p, p.wavelength)?,
        PsfSpec::Confocal(c) => confocal(c)?,
    };
    normalize_sum(&mut v)?;
    v.metadata = Some(spec.to_json());
    Ok(v)
}

pub(crate) fn normalize_sum(v: &mut Volume) -> Result<()> {
    let s = v.sum();
    if !(s > 0.0 && s.is_finite()) {
        return Err(Error::invalid("PSF has no positive intensity"));
    }
    v.data.iter_mut().for_each(|x| *x = (*x as f64 / s) as f32);
    Ok(())
}

/// A normalized Gaussian kernel with standard deviations `sigma` (voxels) at integer
/// offsets from the center voxel `dims / 2`.
pub fn gaussian_kernel(dims: [usize; 3], sigma: [f64; 3]) -> Volume {
    let c = [dims[0] / 2, dims[1] / 2, dims[2] / 2];
    let prof: Vec<Vec<f64>> = (0..3)
        .map(|a| {
            (0..dims[a])
                .map(|i| {
                    let d = i as f64 - c[a] as f64;
                    (-0.5 * d * d / (sigma[a] * sigma[a])).exp()
                })
                .collect()
        })
        .collect();
    let mut data = Vec::with_capacity(dims.iter().product());
    for z in 0..dims[0] {
        for y in 0..dims[1] {
            for x in 0..dims[2] {
                data.push((prof[0][z] * prof[1][y] * prof[2][x]) as f32);
            }
        }
    }
    let mut v = Volume::new(dims, data).expect("sized");
    let _ = normalize_sum(&mut v);
    v
}

fn gaussian(g: &GaussianPsf) -> Result<Volume> {
    if g.fwhm.iter().chain(&g.voxel_size).any(|&v| !(v.is_finite() && v > 0.0)) {
        return Err(Error::invalid("Gaussian PSF: FWHM and voxel size must be positive"));
    }
    if g.shape.contains(&0) {
        return Err(Error::invalid("Gaussian PSF: empty shape"));
    }
    let sigma = [0, 1, 2].map(|a| g.fwhm[a] / FWHM_PER_SIGMA / g.voxel_size[a]);
    Ok(gaussian_kernel(g.shape, sigma).with_voxel_size(g.voxel_size))
}

impl GibsonLanni {
    pub fn validate(&self) -> Result<()> {
        let pos = [
            ("na", self.na),
            ("wavelength", self.wavelength),
            ("ns", self.ns),
            ("ni", self.ni),
            ("ni0", self.ni0),
            ("ng", self.ng),
            ("ng0", self.ng0),
            ("dxy", self.dxy),
            ("dz", self.dz),
        ];
        for (n, v) in pos {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::invalid(format!("Gibson–Lanni: {n} must be positive (got {v})")));
            }
        }
        for (n, v) in [("tg", self.tg), ("tg0", self.tg0), ("ti0", self.ti0), ("pz", self.pz)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(format!("Gibson–Lanni: {n} must be ≥ 0 (got {v})")));
            }
        }
        if self.na >= self.ni {
            return Err(Error::invalid(format!(
                "Gibson–Lanni: NA ({}) must be below ni ({})",
                self.na, self.ni
            )));
        }
        if self.nx == 0 || self.nz == 0 || self.oversample == 0 {
            return Err(Error::invalid("Gibson–Lanni: nx, nz and oversample must be ≥ 1"));
        }
        if self.nx > 4097 || self.nz > 4097 || self.oversample > 16 {
            return Err(Error::invalid("Gibson–Lanni: nx, nz ≤ 4097 and oversample ≤ 16"));
        }
        Ok(())
    }

    /// Focal positions (µm, relative to the coverslip) of the planes: the source depth
    /// `pz` at plane nz/2, steps of dz.
    pub fn focal_positions(&self) -> Vec<f64> {
        (0..self.nz)
            .map(|k| self.pz + (k as f64 - (self.nz / 2) as f64) * self.dz)
            .collect()
    }
}

/// Composite Simpson weights for n (even) intervals of width h.
fn simpson_weights(n: usize, h: f64) -> Vec<f64> {
    (0..=n)
        .map(|i| {
            let w = if i == 0 || i == n {
                1.0
            } else if i % 2 == 1 {
                4.0
            } else {
                2.0
            };
            w * h / 3.0
        })
        .collect()
}

/// The Gibson–Lanni optical path difference (µm) at aperture angle θ (ni·sinθ = NA·ρ)
/// for focal position `z`: Aguet et al. 2009, eq. (5)–(6) with the constant term `ci`.
fn opd(p: &GibsonLanni, sin_t: f64, z: f64, ci: f64) -> Complex64 {
    let s2 = p.ni * p.ni * sin_t * sin_t;
    let root = |n: f64| Complex64::new(n * n - s2, 0.0).sqrt();
    let cos_t = (1.0 - sin_t * sin_t).sqrt();
    Complex64::new(p.ni * (ci - z) * cos_t, 0.0) + p.pz * root(p.ns) + p.tg * root(p.ng)
        - p.tg0 * root(p.ng0)
        - p.ti0 * root(p.ni0)
}

/// The scalar widefield PSF of `p` at emission wavelength `wavelength`, pixel-integrated
/// by `p.oversample`² sub-samples (not normalized).
fn gibson_lanni(p: &GibsonLanni, wavelength: f64) -> Result<Volume> {
    p.validate()?;
    if !(wavelength > 0.0) {
        return Err(Error::invalid("wavelength must be positive"));
    }
    let k0 = 2.0 * std::f64::consts::PI / wavelength;
    let alpha = (p.na / p.ni).asin();
    let ci = p.pz * (1.0 - p.ni / p.ns) + p.ni * (p.tg0 / p.ng0 + p.ti0 / p.ni0 - p.tg / p.ng);
    let zs = p.focal_positions();
    let sf = p.oversample;
    let c0 = (p.nx / 2) as f64;
    // radial samples, fine enough for linear interpolation
    let dr = (p.dxy / (2.0 * sf as f64)).min(0.02 * wavelength / p.na);
    let rmax = ((c0 + 1.0) * std::f64::consts::SQRT_2 + 1.0) * p.dxy;
    let nr = (rmax / dr).ceil() as usize + 2;
    // integration points over θ ∈ [0, α]: enough to resolve the phase and the Bessel term
    let probe = 2048;
    let mut tv_max: f64 = 0.0;
    for &z in &zs {
        let mut tv = 0.0;
        let mut prev = 0.0;
        for i in 0..=probe {
            let t = alpha * i as f64 / probe as f64;
            let ph = k0 * opd(p, t.sin(), z, ci).re;
            if i > 0 {
                tv += (ph - prev).abs();
            }
            prev = ph;
        }
        tv_max = tv_max.max(tv);
    }
    let bessel_span = k0 * p.ni * rmax * alpha.sin();
    let cycles = (tv_max + bessel_span) / (2.0 * std::f64::consts::PI);
    let n_theta = ((cycles * 24.0).ceil() as usize).clamp(200, 40_000) & !1;
    let h = alpha / n_theta as f64;
    let w = simpson_weights(n_theta, h);
    let thetas: Vec<f64> = (0..=n_theta).map(|i| i as f64 * h).collect();
    // J0 table [r][θ] times the aperture weight sinθ·cosθ and the Simpson weight
    let jt: Vec<f64> = (0..nr)
        .into_par_iter()
        .flat_map_iter(|ri| {
            let r = ri as f64 * dr;
            thetas
                .iter()
                .zip(&w)
                .map(move |(&t, &wt)| libm::j0(k0 * p.ni * r * t.sin()) * t.sin() * t.cos() * wt)
        })
        .collect();
    let nt = n_theta + 1;
    // per plane: radial profile I(r) = |Σθ J0·e^{i k0 OPD}|², then pixels by sub-sample averaging
    let nx = p.nx;
    let planes: Vec<Vec<f32>> = zs
        .par_iter()
        .map(|&z| {
            let e: Vec<Complex64> = thetas
                .iter()
                .map(|&t| {
                    let o = opd(p, t.sin(), z, ci);
                    // complex OPD (evanescent terms) → decaying amplitude
                    (Complex64::new(0.0, k0) * o).exp()
                })
                .collect();
            let prof: Vec<f64> = (0..nr)
                .map(|ri| {
                    let row = &jt[ri * nt..(ri + 1) * nt];
                    let mut acc = Complex64::new(0.0, 0.0);
                    for (a, b) in row.iter().zip(&e) {
                        acc += b * *a;
                    }
                    acc.norm_sqr()
                })
                .collect();
            let mut plane = vec![0.0f32; nx * nx];
            let sub: Vec<f64> = (0..sf)
                .map(|s| (s as f64 - (sf as f64 - 1.0) / 2.0) / sf as f64)
                .collect();
            for iy in 0..nx {
                for ix in 0..nx {
                    let mut acc = 0.0;
                    for sy in &sub {
                        for sx in &sub {
                            let y = (iy as f64 - c0 + sy) * p.dxy;
                            let x = (ix as f64 - c0 + sx) * p.dxy;
                            let rr = (x * x + y * y).sqrt() / dr;
                            let r0 = rr.floor() as usize;
                            let f = rr - r0 as f64;
                            acc += if r0 + 1 < nr {
                                prof[r0] * (1.0 - f) + prof[r0 + 1] * f
                            } else {
                                0.0
                            };
                        }
                    }
                    plane[iy * nx + ix] = (acc / (sf * sf) as f64) as f32;
                }
            }
            plane
        })
        .collect();
    let data: Vec<f32> = planes.into_iter().flatten().collect();
    let mut v = Volume::new([p.nz, nx, nx], data)?.with_voxel_size([p.dz, p.dxy, p.dxy]);
    normalize_sum(&mut v)?;
    Ok(v)
}

fn confocal(c: &ConfocalPsf) -> Result<Volume> {
    let p = &c.optics;
    if !(c.ex_wavelength > 0.0) || !(c.pinhole_au >= 0.0) {
        return Err(Error::invalid(
            "confocal PSF: excitation wavelength > 0 and pinhole ≥ 0 AU needed",
        ));
    }
    let ex = gibson_lanni(p, c.ex_wavelength)?;
    if c.pinhole_au >= 50.0 {
        return Ok(ex);
    }
    let mut em = gibson_lanni(p, p.wavelength)?;
    if c.pinhole_au > 0.0 {
        // pinhole radius in pixels: pinhole_au · 0.61 λ_em / NA
        let rad = c.pinhole_au * 0.61 * p.wavelength / p.na / p.dxy;
        let ri = rad.floor() as i64;
        let taps: Vec<(i64, i64)> = (-ri..=ri)
            .flat_map(|dy| (-ri..=ri).map(move |dx| (dy, dx)))
            .filter(|&(dy, dx)| ((dy * dy + dx * dx) as f64).sqrt() <= rad)
            .collect();
        let nx = p.nx as i64;
        em.data.par_chunks_mut(p.nx * p.nx).for_each(|plane| {
            let src = plane.to_vec();
            for y in 0..nx {
                for x in 0..nx {
                    let mut acc = 0.0f64;
                    for &(dy, dx) in &taps {
                        let (yy, xx) = (y - dy, x - dx);
                        if (0..nx).contains(&yy) && (0..nx).contains(&xx) {
                            acc += src[(yy * nx + xx) as usize] as f64;
                        }
                    }
                    plane[(y * nx + x) as usize] = acc as f32;
                }
            }
        });
    }
    let data: Vec<f32> = ex.data.iter().zip(&em.data).map(|(a, b)| a * b).collect();
    ex.like(data)
}

/// Checks that a PSF is sampled like the data it is used on. Err when both voxel sizes are
/// known and differ by more than 1% on an axis (with what to do); Ok(Some(note)) when one
/// is unknown (nothing could be checked); Ok(None) when they match.
pub fn check_voxel_sizes_match(psf: &Volume, data: &Volume) -> Result<Option<String>> {
    match (psf.voxel_size, data.voxel_size) {
        (Some(p), Some(d)) => {
            if (0..3).any(|a| (p[a] - d[a]).abs() > 0.01 * d[a]) {
                return Err(Error::invalid(format!(
                    "the PSF's voxel size ({}×{}×{} µm) differs from the data's ({}×{}×{} µm): the PSF would be \
                     {:.2}×{:.2}×{:.2} too long; resample it (rln-engine psf --measured BEAD --like DATA, or a model \
                     PSF with the data's --dz/--dxy)",
                    p[0],
                    p[1],
                    p[2],
                    d[0],
                    d[1],
                    d[2],
                    d[0] / p[0],
                    d[1] / p[1],
                    d[2] / p[2]
                )));
            }
            Ok(None)
        }
        (None, None) => Ok(Some(
            "neither the PSF nor the data records a voxel size: make sure they are sampled alike".into(),
        )),
        (None, Some(_)) => Ok(Some(
            "the PSF records no voxel size: make sure it is sampled like the data".into(),
        )),
        (Some(_), None) => Ok(Some(
            "the data record no voxel size: make sure the PSF is sampled like them".into(),
        )),
    }
}

pub use super::measured_psf::{clean_measured, CentreRule, MeasuredOptions, MeasuredReport};

/// FWHM (z, y, x) in voxels along the three axes through the brightest voxel, half-maximum
/// crossings linearly interpolated (a side with no crossing counts to the volume edge).
pub fn fwhm_voxels(psf: &Volume) -> [f64; 3] {
    let (imax, &peak) = psf
        .data
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap_or((0, &0.0));
    let [_, ny, nx] = psf.dims;
    let c = [imax / (ny * nx), (imax / nx) % ny, imax % nx];
    let half = peak as f64 / 2.0;
    let mut out = [0.0; 3];
    for a in 0..3 {
        let line: Vec<f64> = (0..psf.dims[a])
            .map(|i| {
                let mut p = c;
                p[a] = i;
                psf.at(p[0], p[1], p[2]) as f64
            })
            .collect();
        let ci = c[a];
        let mut right = (line.len() - 1) as f64;
        for i in ci..line.len() - 1 {
            if line[i + 1] < half {
                right = i as f64 + (line[i] - half) / (line[i] - line[i + 1]);
                break;
            }
        }
        let mut left = 0.0;
        for i in (1..=ci).rev() {
            if line[i - 1] < half {
                left = i as f64 - (line[i] - half) / (line[i] - line[i - 1]);
                break;
            }
        }
        out[a] = right - left;
    }
    out
}

/// Standard deviations (z, y, x) in voxels from the second moments about the centroid.
pub fn moment_sigma(psf: &Volume) -> [f64; 3] {
    let [nz, ny, nx] = psf.dims;
    let s = psf.sum();
    let mut m1 = [0.0f64; 3];
    let mut m2 = [0.0f64; 3];
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let w = psf.at(z, y, x) as f64 / s;
                for (a, c) in [z, y, x].into_iter().enumerate() {
                    m1[a] += w * c as f64;
                    m2[a] += w * (c * c) as f64;
                }
            }
        }
    }
    [0, 1, 2].map(|a| (m2[a] - m1[a] * m1[a]).max(0.0).sqrt())
}
