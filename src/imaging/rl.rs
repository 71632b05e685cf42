//! Classical Richardson–Lucy deconvolution on the FFT, without wrap-around.
//!
//! Geometry: the image Ω (size I) is explained by an object on Ω' = Ω grown by the PSF
//! (size I + P − 1); the FFT grid holds Ω' and is at least I + P − 1 long on each axis,
//! so circular convolution equals linear convolution on Ω. The update is the
//! boundary-aware RL of Bertero & Boccacci (A&A 2005):
//! `e ← e · B(r) / B(1_Ω)` with `r = y / (H e + b)` on Ω and 0 outside, where `H` is the
//! PSF, `B` the back projector (Hᵀ for `matched`), and `B(1_Ω)` the normalization that
//! makes edges converge like the interior. With the matched projector `Σ_Ω' e·Hᵀ1_Ω`
//! equals `Σ_Ω y·He/(He+b)` after every iteration (flux is kept).
//!
//! The Wiener–Butterworth back projector is that of Guo et al., Nat. Biotechnol. 38,
//! 1337 (2020): `B = Butterworth · Ĥ*/(|Ĥ|² + α)` with the Butterworth cutoff at the
//! PSF's FWHM (per axis) and gain β there, order n; here its DC gain is scaled to 1.
//!
//! Options comparable with cudaDecon (Shao/Gustafsson's GPU RL): `accelerate` is the
//! Biggs–Andrews vector extrapolation (Appl. Opt. 36, 1766 (1997)) as cudaDecon does it:
//! `y_k = max(x_k + λ_k (x_k − x_{k−1}), 0)`, the RL step taken from `y_k`, with
//! `λ_k = Σ g_{k−1}·g_{k−2} / Σ g_{k−2}²` clamped to [0, 1] and `g_k = x_{k+1} − y_k`;
//! `Boundary::Periodic` is cudaDecon's FFT on the image itself, `apodize` its edge blend
//! (Gustafsson's: the first and last N columns and rows pulled towards each other's
//! mean with weights 1 − sin((k + ½)/N · π/2)), `BackgroundMode::Subtract` its
//! `max(y − b, 0)` before the iterations.
//!
//! Stopping aid: every iteration reports `‖x_k − x_{k−1}‖ / ‖x_{k−1}‖` (on the estimated
//! domain); `stop_change` ends the run at the first iteration whose change is below it.

use super::fft::{fast_len, Fft3};
use super::progress;
use super::psf::fwhm_voxels;
use super::volume::{dims_str, Volume};
use crate::error::{Error, Result};
use rayon::prelude::*;
use rustfft::num_complex::Complex32;
use std::ops::ControlFlow;

/// Which back projector the RL update uses.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BackProjector {
    /// The flipped PSF (classical RL).
    Matched,
    /// Guo et al. 2020: Wiener filter (parameter `alpha`) times a Butterworth filter of
    /// order `order` whose gain at the PSF's FWHM cutoff is `beta`.
    WienerButterworth { alpha: f64, beta: f64, order: f64 },
}

impl BackProjector {
    /// Defaults from a sweep on synthetic pairs (docs/imaging.md): Guo et al.'s suggested
    /// α of 1e-4…1e-3 amplifies noise until the multiplicative update degrades on
    /// widefield data; α = 0.1 is stable. β hardly matters at α = 0.1.
    pub const WB_DEFAULT: BackProjector = BackProjector::WienerButterworth {
        alpha: 0.1,
        beta: 0.3,
        order: 10.0,
    };
}

/// How the image edges are treated (all keep the FFT from wrapping into the image).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Boundary {
    /// `Free` for the matched projector, `Mirror` for Wiener–Butterworth (the unmatched
    /// projector rings, and is unstable, where the object is only weakly constrained).
    #[default]
    Auto,
    /// The data are extended by mirror reflection over the PSF margin and the object is
    /// estimated there too.
    Mirror,
    /// The FFT runs on the image itself, which wraps around (cudaDecon); use with `apodize`.
    Periodic,
    /// Only the measured voxels constrain the object, which may extend past the image
    /// (Bertero & Boccacci 2005); exact flux, but edge planes can ring when bright
    /// structures sit just outside the field of view.
    Free,
}

/// Settings of a deconvolution run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RlConfig {
    pub iterations: usize,
    /// Constant background `b` in the image model `y = H e + b` (same units as the input).
    pub background: f32,
    pub back_projector: BackProjector,
    #[serde(default)]
    pub boundary: Boundary,
    /// Biggs–Andrews acceleration (cudaDecon's).
    #[serde(default)]
    pub accelerate: bool,
    #[serde(default)]
    pub background_mode: BackgroundMode,
    /// Edge blend width in voxels along x and y (0: none), applied to the data first.
    #[serde(default)]
    pub apodize: usize,
    /// Stop at the first iteration whose relative change is below this (`iterations` is
    /// then the most it runs).
    #[serde(default)]
    pub stop_change: Option<f64>,
}

impl Default for RlConfig {
    fn default() -> Self {
        RlConfig {
            iterations: 50,
            background: 0.0,
            back_projector: BackProjector::Matched,
            boundary: Boundary::Auto,
            accelerate: false,
            background_mode: BackgroundMode::Model,
            apodize: 0,
            stop_change: None,
        }
    }
}

/// How the background enters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackgroundMode {
    /// In the image model, `y = H e + b` (the estimate stays ≥ 0 and flux is exact).
    #[default]
    Model,
    /// Subtracted from the data first, `y ← max(y − b, 0)`, then `b = 0` (cudaDecon).
    Subtract,
}

/// How one run goes beyond the iteration count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunOptions {
    pub accelerate: bool,
    pub background_mode: BackgroundMode,
    pub apodize: usize,
    pub stop_change: Option<f64>,
}

/// One iteration as it went.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct IterationStat {
    /// ‖x_k − x_{k−1}‖ / ‖x_{k−1}‖ over the estimated domain.
    pub change: f64,
    /// The acceleration factor used (0 without acceleration).
    pub lambda: f64,
}

impl RlConfig {
    pub fn run_options(&self) -> RunOptions {
        RunOptions {
            accelerate: self.accelerate,
            background_mode: self.background_mode,
            apodize: self.apodize,
            stop_change: self.stop_change,
        }
    }
}

/// Gustafsson's edge blend (cudaDecon's `apodize`) along x and y of every plane: the
/// first and last `n` voxels of each line move towards each other by
/// `±(last − first)/2 · (1 − sin((k + ½)/n · π/2))`, so the image wraps smoothly.
pub fn apodize_xy(v: &mut Volume, n: usize) {
    let [nz, ny, nx] = v.dims;
    let w: Vec<f32> = (0..n)
        .map(|k| (1.0 - ((k as f64 + 0.5) / n as f64 * std::f64::consts::FRAC_PI_2).sin()) as f32)
        .collect();
    let nxn = n.min(nx / 2);
    let nyn = n.min(ny / 2);
    for z in 0..nz {
        let p = &mut v.data[z * ny * nx..(z + 1) * ny * nx];
        for y in 0..ny {
            let row = &mut p[y * nx..(y + 1) * nx];
            let diff = (row[nx - 1] - row[0]) / 2.0;
            for k in 0..nxn {
                row[k] += diff * w[k];
                row[nx - 1 - k] -= diff * w[k];
            }
        }
        for x in 0..nx {
            let diff = (p[(ny - 1) * nx + x] - p[x]) / 2.0;
            for k in 0..nyn {
                p[k * nx + x] += diff * w[k];
                p[(ny - 1 - k) * nx + x] -= diff * w[k];
            }
        }
    }
}

/// FFT plans, PSF spectrum, back projector and edge normalization for one image size and
/// one PSF: build once, run on many images of that size.
pub struct RlPlan {
    img: [usize; 3],
    psf_dims: [usize; 3],
    /// Ω' = Ω grown by the PSF: I + P − 1.
    ext: [usize; 3],
    /// Position of Ω inside Ω' (and the grid): P − 1 − c with c the PSF center.
    off: [usize; 3],
    grid: [usize; 3],
    fft: Fft3,
    otf: Vec<Complex32>,
    otf_bp: Vec<Complex32>,
    /// 1 / B(1_Ω) on Ω' where B(1_Ω) is usable, 0 elsewhere (grid layout).
    inv_norm: Vec<f32>,
    pub back_projector: BackProjector,
    pub boundary: Boundary,
    /// The region whose data drive the update: Ω (free) or Ω' (mirror), as (start, size).
    observed: ([usize; 3], [usize; 3]),
}

/// What [`measure_throughput`] measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RlThroughput {
    pub dims: [usize; 3],
    pub psf_dims: [usize; 3],
    pub fft_grid: [usize; 3],
    pub iterations: usize,
    pub seconds: f64,
    pub voxel_iterations_per_s: f64,
    pub threads: usize,
}

fn psf_center(d: [usize; 3]) -> [usize; 3] {
    [d[0] / 2, d[1] / 2, d[2] / 2]
}

/// Ω' for an image `img` and a PSF of size `p`: (its size I + P − 1, where the image
/// sits in it, the FFT grid that holds it).
fn grown_domain(img: [usize; 3], p: [usize; 3]) -> ([usize; 3], [usize; 3], [usize; 3]) {
    let c = psf_center(p);
    let ext = [img[0] + p[0] - 1, img[1] + p[1] - 1, img[2] + p[2] - 1];
    let off = [p[0] - 1 - c[0], p[1] - 1 - c[1], p[2] - 1 - c[2]];
    let grid = [fast_len(ext[0], false), fast_len(ext[1], false), fast_len(ext[2], true)];
    (ext, off, grid)
}

/// The size in data voxels (`voxel`, z y x µm) of the PSF a radial OTF stands for: the
/// field it was measured on, at most the image's size `img`.
fn otf_psf_dims(otf: &super::radial_otf::RadialOtf, voxel: [f64; 3], img: [usize; 3]) -> Result<[usize; 3]> {
    let n = otf.field_extent(voxel)?;
    Ok([0, 1, 2].map(|a| n[a].clamp(1, img[a])))
}

impl RlPlan {
    /// Plans deconvolution of `img`-sized volumes by `psf` (which is normalized to sum 1
    /// here), boundary `Auto`.
    pub fn new(img: [usize; 3], psf: &Volume, back_projector: BackProjector) -> Result<Self> {
        Self::with_boundary(img, psf, back_projector, Boundary::Auto)
    }

    pub fn with_boundary(
        img: [usize; 3],
        psf: &Volume,
        back_projector: BackProjector,
        boundary: Boundary,
    ) -> Result<Self> {
        let p = psf.dims;
        if img.contains(&0) || p.contains(&0) {
            return Err(Error::invalid("empty image or PSF"));
        }
        if (0..3).any(|a| p[a] > img[a]) {
            return Err(Error::invalid(format!(
                "PSF ({}) is larger than the image ({}) along an axis; crop the PSF (rln-engine psf --measured … --crop) \
                 or use a larger image",
                dims_str(p),
                dims_str(img)
            )));
        }
        psf.check_finite("PSF")?;
        let s = psf.sum();
        if !(s > 0.0) || psf.data.iter().any(|&v| v < 0.0) {
            return Err(Error::invalid("PSF must be non-negative with a positive sum"));
        }
        let c = psf_center(p);
        let (ext, off, grid) = if boundary == Boundary::Periodic {
            (img, [0; 3], img)
        } else {
            grown_domain(img, p)
        };
        let fft = Fft3::new(grid);
        let n = fft.real_len();
        let sl = fft.spectrum_len();
        let mut scratch = vec![Complex32::default(); sl];

        // OTF: PSF with its center at the origin (wrapped), normalized to sum 1
        let mut buf = vec![0.0f32; n];
        let [gz, gy, gx] = grid;
        for z in 0..p[0] {
            for y in 0..p[1] {
                for x in 0..p[2] {
                    let gzz = (z + gz - c[0]) % gz;
                    let gyy = (y + gy - c[1]) % gy;
                    let gxx = (x + gx - c[2]) % gx;
                    buf[(gzz * gy + gyy) * gx + gxx] = (psf.at(z, y, x) as f64 / s) as f32;
                }
            }
        }
        let mut otf = vec![Complex32::default(); sl];
        fft.forward(&mut buf, &mut otf, &mut scratch);

        let otf_bp: Vec<Complex32> = match back_projector {
            BackProjector::Matched => otf.iter().map(|v| v.conj()).collect(),
            BackProjector::WienerButterworth { alpha, beta, order } => {
                wiener_butterworth(&fft, &otf, fwhm_voxels(psf), alpha, beta, order)?
            }
        };
        Ok(Self::from_spectra(
            img,
            p,
            (ext, off, grid),
            fft,
            otf,
            otf_bp,
            back_projector,
            boundary,
        ))
    }

    /// Plans deconvolution of `img`-sized volumes of voxel size `voxel` (z, y, x µm) by a
    /// radially averaged OTF, interpolated onto the FFT grid's frequencies, with the
    /// matched back projector. The bead behind the OTF may be sampled unlike the data.
    ///
    /// `Periodic` (and `Auto`) is cudaDecon's way: the FFT on the image itself. `Free` and
    /// `Mirror` grow the domain to Ω' as the PSF path does (module doc), taking for the
    /// PSF's size the field the OTF was measured on (1/Δk per axis: the bead stack's
    /// extent) in the data's voxels, at most the image's size per axis (the PSF path
    /// refuses a larger PSF; here a tail beyond that would wrap).
    pub fn with_otf(
        img: [usize; 3],
        otf: &super::radial_otf::RadialOtf,
        voxel: [f64; 3],
        boundary: Boundary,
    ) -> Result<Self> {
        if img.contains(&0) {
            return Err(Error::invalid("empty image"));
        }
        let (p, (ext, off, grid)) = match boundary {
            Boundary::Periodic | Boundary::Auto => ([1, 1, 1], (img, [0; 3], img)),
            Boundary::Free | Boundary::Mirror => {
                let p = otf_psf_dims(otf, voxel, img)?;
                (p, grown_domain(img, p))
            }
        };
        let fft = Fft3::new(grid);
        let transfer = otf.on_grid(&fft, voxel)?;
        let back: Vec<Complex32> = transfer.iter().map(|v| v.conj()).collect();
        let boundary = if boundary == Boundary::Auto {
            Boundary::Periodic
        } else {
            boundary
        };
        Ok(Self::from_spectra(
            img,
            p,
            (ext, off, grid),
            fft,
            transfer,
            back,
            BackProjector::Matched,
            boundary,
        ))
    }

    /// The rest of a plan once the forward and back projectors' spectra are known: the
    /// edge normalization B(1_obs) and the observed region.
    #[allow(clippy::too_many_arguments)]
    fn from_spectra(
        img: [usize; 3],
        p: [usize; 3],
        (ext, off, grid): ([usize; 3], [usize; 3], [usize; 3]),
        fft: Fft3,
        otf: Vec<Complex32>,
        otf_bp: Vec<Complex32>,
        back_projector: BackProjector,
        boundary: Boundary,
    ) -> Self {
        let n = fft.real_len();
        let sl = fft.spectrum_len();
        let mut scratch = vec![Complex32::default(); sl];
        let mut buf = vec![0.0f32; n];
        let [_, gy, gx] = grid;

        // B(1_obs): back projection of the indicator of the observed region
        let boundary = match (boundary, back_projector) {
            (Boundary::Auto, BackProjector::Matched) => Boundary::Free,
            (Boundary::Auto, _) => Boundary::Mirror,
            (b, _) => b,
        };
        let observed = match boundary {
            Boundary::Free => (off, img),
            _ => ([0, 0, 0], ext),
        };
        let (os, od) = observed;
        buf.iter_mut().for_each(|v| *v = 0.0);
        for z in 0..od[0] {
            for y in 0..od[1] {
                let i = ((os[0] + z) * gy + os[1] + y) * gx + os[2];
                buf[i..i + od[2]].iter_mut().for_each(|v| *v = 1.0);
            }
        }
        let mut spec = vec![Complex32::default(); sl];
        fft.forward(&mut buf, &mut spec, &mut scratch);
        spec.par_iter_mut().zip(otf_bp.par_iter()).for_each(|(a, b)| *a *= *b);
        fft.inverse(&mut spec, &mut buf, &mut scratch);
        // where B(1_Ω) is this small the object is barely seen: no estimate there. The
        // unmatched projector rings around edges, so it keeps only well-seen voxels.
        let thr: f32 = match back_projector {
            BackProjector::Matched => 1e-3,
            BackProjector::WienerButterworth { .. } => 0.25,
        };
        let mut inv_norm = vec![0.0f32; n];
        inv_norm
            .par_chunks_mut(gy * gx)
            .zip(buf.par_chunks(gy * gx))
            .enumerate()
            .for_each(|(z, (o, w))| {
                if z >= ext[0] {
                    return;
                }
                for y in 0..ext[1] {
                    for x in 0..ext[2] {
                        let i = y * gx + x;
                        if w[i] > thr {
                            o[i] = 1.0 / w[i];
                        }
                    }
                }
            });
        RlPlan {
            img,
            psf_dims: p,
            ext,
            off,
            grid,
            fft,
            otf,
            otf_bp,
            inv_norm,
            back_projector,
            boundary,
            observed,
        }
    }

    pub fn image_dims(&self) -> [usize; 3] {
        self.img
    }
    pub fn psf_dims(&self) -> [usize; 3] {
        self.psf_dims
    }
    pub fn fft_grid(&self) -> [usize; 3] {
        self.grid
    }
    /// Size of the object domain Ω' a forward projection reads (image + PSF − 1).
    pub fn extended_dims(&self) -> [usize; 3] {
        self.ext
    }
    /// Where the image sits inside the extended domain.
    pub fn image_offset(&self) -> [usize; 3] {
        self.off
    }

    fn grid_index(&self, z: usize, y: usize, x: usize) -> usize {
        (z * self.grid[1] + y) * self.grid[2] + x
    }

    /// Linear convolution with the PSF of an object on the extended domain Ω'
    /// (`extended_dims()`), returned on the image domain Ω: the blur of a scene that
    /// extends past the field of view, with nothing wrapping around.
    pub fn blur_extended(&self, object: &Volume) -> Result<Volume> {
        if object.dims != self.ext {
            return Err(Error::Shape(format!(
                "object is {} but the extended domain is {}",
                object.shape_str(),
                dims_str(self.ext)
            )));
        }
        let mut buf = vec![0.0f32; self.fft.real_len()];
        for z in 0..self.ext[0] {
            for y in 0..self.ext[1] {
                let g = self.grid_index(z, y, 0);
                let o = object.index(z, y, 0);
                buf[g..g + self.ext[2]].copy_from_slice(&object.data[o..o + self.ext[2]]);
            }
        }
        self.project(&mut buf, false);
        let mut out = self.crop_image(&buf);
        out.voxel_size = object.voxel_size;
        Ok(out)
    }

    /// Linear convolution of an image-sized volume with the PSF, zero outside the image ("same").
    pub fn convolve_same(&self, vol: &Volume) -> Result<Volume> {
        self.check_input(vol)?;
        let mut buf = vec![0.0f32; self.fft.real_len()];
        self.put_image(&vol.data, &mut buf);
        self.project(&mut buf, false);
        let mut out = self.crop_image(&buf);
        out.voxel_size = vol.voxel_size;
        Ok(out)
    }

    fn check_input(&self, vol: &Volume) -> Result<()> {
        if vol.dims != self.img {
            return Err(Error::Shape(format!(
                "image is {} but the plan was made for {}",
                vol.shape_str(),
                dims_str(self.img)
            )));
        }
        Ok(())
    }

    fn put_image(&self, data: &[f32], buf: &mut [f32]) {
        let [_, iy, ix] = self.img;
        for z in 0..self.img[0] {
            for y in 0..iy {
                let g = self.grid_index(self.off[0] + z, self.off[1] + y, self.off[2]);
                let o = (z * iy + y) * ix;
                buf[g..g + ix].copy_from_slice(&data[o..o + ix]);
            }
        }
    }

    fn crop_image(&self, buf: &[f32]) -> Volume {
        let [iz, iy, ix] = self.img;
        let mut out = Vec::with_capacity(iz * iy * ix);
        for z in 0..iz {
            for y in 0..iy {
                let g = self.grid_index(self.off[0] + z, self.off[1] + y, self.off[2]);
                out.extend_from_slice(&buf[g..g + ix]);
            }
        }
        Volume::new(self.img, out).expect("image-sized crop")
    }

    /// buf ← H buf (or B buf when `back`), in place through the spectrum.
    fn project_with(&self, buf: &mut [f32], back: bool, spec: &mut [Complex32], scratch: &mut [Complex32]) {
        self.fft.forward(buf, spec, scratch);
        let k = if back { &self.otf_bp } else { &self.otf };
        spec.par_chunks_mut(4096).zip(k.par_chunks(4096)).for_each(|(a, b)| {
            for (x, y) in a.iter_mut().zip(b) {
                *x *= *y;
            }
        });
        self.fft.inverse(spec, buf, scratch);
    }

    fn project(&self, buf: &mut [f32], back: bool) {
        let sl = self.fft.spectrum_len();
        let mut spec = vec![Complex32::default(); sl];
        let mut scratch = vec![Complex32::default(); sl];
        self.project_with(buf, back, &mut spec, &mut scratch);
    }

    /// Runs `iterations` RL iterations on `input` (image-sized) with constant `background`.
    /// After each iteration `observe(i, estimate)` sees the current estimate on the image
    /// domain (i = 1, 2, …); returning `ControlFlow::Break(())` stops early. Returns the
    /// last estimate.
    pub fn run<F>(&self, input: &Volume, iterations: usize, background: f32, mut observe: F) -> Result<Volume>
    where
        F: FnMut(usize, &Volume) -> ControlFlow<()>,
    {
        self.run_impl(input, iterations, background, Some(&mut observe))
    }

    /// [`RlPlan::run`] without an observer (no per-iteration copy of the estimate).
    pub fn run_silent(&self, input: &Volume, iterations: usize, background: f32) -> Result<Volume> {
        self.run_impl(input, iterations, background, None)
    }

    /// A run with acceleration, background mode, apodization and the stopping rule of
    /// `opts`; returns the estimate and each iteration's change and λ.
    pub fn run_with_options(
        &self,
        input: &Volume,
        iterations: usize,
        background: f32,
        opts: &RunOptions,
        mut observe: Option<&mut dyn FnMut(usize, &Volume) -> ControlFlow<()>>,
    ) -> Result<(Volume, Vec<IterationStat>)> {
        self.check_input(input)?;
        input.check_finite("RL input")?;
        if !background.is_finite() {
            return Err(Error::invalid("background must be finite"));
        }
        if let Some(t) = opts.stop_change {
            if !(t.is_finite() && t > 0.0) {
                return Err(Error::invalid(format!("stopping change must be > 0 (got {t})")));
            }
        }
        let mut data;
        let mut input = input;
        let mut background = background;
        if opts.background_mode == BackgroundMode::Subtract || opts.apodize > 0 {
            data = input.clone();
            if opts.background_mode == BackgroundMode::Subtract {
                data.data.iter_mut().for_each(|v| *v = (*v - background).max(0.0));
                background = 0.0;
            }
            if opts.apodize > 0 {
                apodize_xy(&mut data, opts.apodize);
            }
            input = &data;
        }
        let mut stats = Vec::new();
        let out = self.iterate(input, iterations, background, opts, &mut stats, observe.take())?;
        Ok((out, stats))
    }

    #[allow(clippy::type_complexity)]
    fn run_impl(
        &self,
        input: &Volume,
        iterations: usize,
        background: f32,
        observe: Option<&mut dyn FnMut(usize, &Volume) -> ControlFlow<()>>,
    ) -> Result<Volume> {
        Ok(self
            .run_with_options(input, iterations, background, &RunOptions::default(), observe)?
            .0)
    }

    #[allow(clippy::type_complexity)]
    fn iterate(
        &self,
        input: &Volume,
        iterations: usize,
        background: f32,
        opts: &RunOptions,
        stats: &mut Vec<IterationStat>,
        mut observe: Option<&mut dyn FnMut(usize, &Volume) -> ControlFlow<()>>,
    ) -> Result<Volume> {
        let n = self.fft.real_len();
        let sl = self.fft.spectrum_len();
        let [_, gy, gx] = self.grid;
        let plane = gy * gx;
        let (os, od) = self.observed;
        // the data on the grid: the image on Ω, mirrored over the rest of Ω' (mirror mode)
        let mut y = vec![0.0f32; n];
        let [iz, iy, ix] = self.img;
        let refl = |i: usize, off: usize, len: usize| -> usize {
            let mut k = i as i64 - off as i64;
            let l = len as i64;
            loop {
                if k < 0 {
                    k = -k - 1;
                } else if k >= l {
                    k = 2 * l - k - 1;
                } else {
                    return k as usize;
                }
            }
        };
        y.par_chunks_mut(plane).enumerate().for_each(|(z, yp)| {
            if z < os[0] || z >= os[0] + od[0] {
                return;
            }
            let sz = refl(z, self.off[0], iz);
            for yy in os[1]..os[1] + od[1] {
                let sy = refl(yy, self.off[1], iy);
                for x in os[2]..os[2] + od[2] {
                    yp[yy * gx + x] = input.data[(sz * iy + sy) * ix + refl(x, self.off[2], ix)].max(0.0);
                }
            }
        });
        let mean = (input
            .data
            .iter()
            .map(|&v| (v - background).max(0.0) as f64)
            .sum::<f64>()
            / input.len() as f64) as f32;
        let floor = (mean * 1e-6).max(f32::MIN_POSITIVE);
        let den_floor = (mean.max(background.abs()) * 1e-6).max(f32::MIN_POSITIVE);
        let in_obs = |z: usize, yy: usize, x: usize| {
            (os[0]..os[0] + od[0]).contains(&z)
                && (os[1]..os[1] + od[1]).contains(&yy)
                && (os[2]..os[2] + od[2]).contains(&x)
        };
        // first estimate: the (background-subtracted) data where observed, their mean elsewhere
        let mut est = vec![0.0f32; n];
        est.par_chunks_mut(plane).enumerate().for_each(|(z, e)| {
            for yy in 0..gy {
                for x in 0..gx {
                    let i = yy * gx + x;
                    if self.inv_norm[z * plane + i] > 0.0 {
                        e[i] = if in_obs(z, yy, x) {
                            (y[z * plane + i] - background).max(floor)
                        } else {
                            mean.max(floor)
                        };
                    }
                }
            }
        });
        let mut tmp = vec![0.0f32; n];
        let mut scratch = vec![Complex32::default(); sl];
        let clamp_floor = if matches!(self.back_projector, BackProjector::Matched) {
            0.0
        } else {
            floor
        };
        let pb = progress::bar(iterations as u64, "RL");
        let inv_norm = &self.inv_norm;
        // x_{k-1}, and with acceleration y_k and the last two steps g_{k-1}, g_{k-2}
        let mut prev = vec![0.0f32; n];
        let (mut yk, mut g1, mut g2) = if opts.accelerate {
            (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n])
        } else {
            (Vec::new(), Vec::new(), Vec::new())
        };
        for it in 1..=iterations {
            let mut lambda = 0.0f64;
            if opts.accelerate && it >= 3 {
                let (num, den) = g1
                    .par_chunks(plane)
                    .zip(g2.par_chunks(plane))
                    .map(|(a, b)| {
                        a.iter().zip(b).fold((0.0f64, 0.0f64), |(n, d), (&x, &y)| {
                            (n + x as f64 * y as f64, d + y as f64 * y as f64)
                        })
                    })
                    .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
                lambda = if den > 0.0 { (num / den).clamp(0.0, 1.0) } else { 0.0 };
            }
            // prev ← x_k and, accelerated, est ← y_k = max(x_k + λ (x_k − x_{k−1}), 0)
            let l = lambda as f32;
            est.par_chunks_mut(plane)
                .zip(prev.par_chunks_mut(plane))
                .for_each(|(e, p)| {
                    for (e, p) in e.iter_mut().zip(p.iter_mut()) {
                        let x = *e;
                        if l > 0.0 {
                            *e = (x + l * (x - *p)).max(0.0);
                        }
                        *p = x;
                    }
                });
            if opts.accelerate {
                yk.copy_from_slice(&est);
            }
            // He, and at once the ratio y / (He + b) on the observed region (0 elsewhere)
            self.fft.convolve_planes(
                &est,
                &self.otf,
                Some((0..self.ext[0], 0..self.ext[1])),
                &mut scratch,
                &mut tmp,
                os[0]..os[0] + od[0],
                |z, t, he| {
                    if z < os[0] || z >= os[0] + od[0] {
                        t.iter_mut().for_each(|v| *v = 0.0);
                        return;
                    }
                    let yv = &y[z * plane..(z + 1) * plane];
                    for yy in 0..gy {
                        let (row, hr, yr) = (
                            &mut t[yy * gx..(yy + 1) * gx],
                            &he[yy * gx..(yy + 1) * gx],
                            &yv[yy * gx..(yy + 1) * gx],
                        );
                        if yy < os[1] || yy >= os[1] + od[1] {
                            row.iter_mut().for_each(|v| *v = 0.0);
                            continue;
                        }
                        for x in 0..gx {
                            row[x] = if x >= os[2] && x < os[2] + od[2] {
                                yr[x] / (hr[x] + background).max(den_floor)
                            } else {
                                0.0
                            };
                        }
                    }
                },
            );
            // B(ratio), and at once the multiplicative update e ← e · B(r) / B(1)
            self.fft.convolve_planes(
                &tmp,
                &self.otf_bp,
                Some((os[0]..os[0] + od[0], os[1]..os[1] + od[1])),
                &mut scratch,
                &mut est,
                0..self.ext[0],
                |z, e, g| {
                    let w = &inv_norm[z * plane..(z + 1) * plane];
                    for i in 0..plane {
                        // f32 round-off can make tiny negatives; the unmatched projector real ones
                        e[i] = if w[i] > 0.0 {
                            (e[i] * g[i] * w[i]).max(clamp_floor)
                        } else {
                            0.0
                        };
                    }
                },
            );
            pb.inc(1);
            if opts.accelerate {
                std::mem::swap(&mut g1, &mut g2);
                g1.par_chunks_mut(plane)
                    .zip(est.par_chunks(plane).zip(yk.par_chunks(plane)))
                    .for_each(|(g, (e, y))| {
                        for ((g, e), y) in g.iter_mut().zip(e).zip(y) {
                            *g = e - y;
                        }
                    });
            }
            let (d2, p2) = est
                .par_chunks(plane)
                .zip(prev.par_chunks(plane))
                .map(|(e, p)| {
                    e.iter().zip(p).fold((0.0f64, 0.0f64), |(d, n), (&a, &b)| {
                        (d + (a as f64 - b as f64).powi(2), n + b as f64 * b as f64)
                    })
                })
                .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            let change = if p2 > 0.0 { (d2 / p2).sqrt() } else { 0.0 };
            stats.push(IterationStat { change, lambda });
            pb.set_message(format!("change {change:.2e}"));
            if let Some(obs) = observe.as_mut() {
                let cur = self.crop_image(&est);
                if obs(it, &cur).is_break() {
                    break;
                }
            }
            if opts.stop_change.is_some_and(|t| change < t) {
                break;
            }
        }
        pb.finish_and_clear();
        let mut out = self.crop_image(&est);
        out.voxel_size = input.voxel_size;
        out.unit = input.unit.clone();
        out.check_finite_result("Richardson–Lucy")?;
        Ok(out)
    }
}

/// Guo et al.'s Wiener–Butterworth back projector on the FFT grid of `fft`.
fn wiener_butterworth(
    fft: &Fft3,
    otf: &[Complex32],
    fwhm: [f64; 3],
    alpha: f64,
    beta: f64,
    order: f64,
) -> Result<Vec<Complex32>> {
    if !(alpha > 0.0 && beta > 0.0 && beta < 1.0 && order > 0.0) {
        return Err(Error::invalid(format!(
            "Wiener–Butterworth needs alpha > 0, 0 < beta < 1, order > 0 (got {alpha}, {beta}, {order})"
        )));
    }
    let m = otf[0].norm() as f64;
    let wiener: Vec<(f64, f64)> = otf
        .iter()
        .map(|h| {
            let (re, im) = (h.re as f64 / m, -h.im as f64 / m);
            let d = re * re + im * im + alpha;
            (re / d, im / d)
        })
        .collect();
    let g = fft.dims;
    // cutoff frequency (in FFT bins) at the resolution limit = FWHM of the PSF
    let kc: Vec<f64> = (0..3).map(|a| g[a] as f64 / fwhm[a].max(1e-3)).collect();
    // gain of the Wiener filter at the x cutoff, central z plane, max over y
    let kx_c = (kc[2].round() as i64).min(g[2] as i64 / 2);
    let mut beta_w: f64 = 0.0;
    for (i, w) in wiener.iter().enumerate() {
        let k = fft.freq(i);
        if k[0] == 0 && k[2] == kx_c {
            beta_w = beta_w.max((w.0 * w.0 + w.1 * w.1).sqrt());
        }
    }
    let ee = (beta_w / (beta * beta) - 1.0).max(0.0);
    let mut out: Vec<Complex32> = wiener
        .iter()
        .enumerate()
        .map(|(i, &(re, im))| {
            let k = fft.freq(i);
            let w: f64 = (0..3).map(|a| (k[a] as f64 / kc[a]).powi(2)).sum();
            let mask = 1.0 / (1.0 + ee * w.powf(order)).sqrt();
            Complex32::new((re * mask) as f32, (im * mask) as f32)
        })
        .collect();
    let dc = out[0].re;
    if !(dc > 0.0) {
        return Err(Error::invalid(
            "Wiener–Butterworth back projector has no DC gain (PSF spectrum degenerate?)",
        ));
    }
    out.iter_mut().for_each(|v| *v /= dc);
    Ok(out)
}

/// Deconvolves `input` by `psf` with `cfg`.
pub fn richardson_lucy(input: &Volume, psf: &Volume, cfg: &RlConfig) -> Result<Volume> {
    Ok(richardson_lucy_traced(input, psf, cfg)?.0)
}

/// [`richardson_lucy`] that also returns each iteration's change and acceleration factor.
pub fn richardson_lucy_traced(input: &Volume, psf: &Volume, cfg: &RlConfig) -> Result<(Volume, Vec<IterationStat>)> {
    let plan = RlPlan::with_boundary(input.dims, psf, cfg.back_projector, cfg.boundary)?;
    plan.run_with_options(input, cfg.iterations, cfg.background, &cfg.run_options(), None)
}

/// [`richardson_lucy_traced`] by a radially averaged OTF instead of a PSF (see
/// [`RlPlan::with_otf`]); `voxel` is the input's voxel size. Only the matched back
/// projector exists on this route (another is refused); edges are periodic unless `cfg`
/// asks for free or mirror ones.
pub fn richardson_lucy_otf(
    input: &Volume,
    otf: &super::radial_otf::RadialOtf,
    voxel: [f64; 3],
    cfg: &RlConfig,
) -> Result<(Volume, Vec<IterationStat>)> {
    if !matches!(cfg.back_projector, BackProjector::Matched) {
        return Err(Error::invalid("an OTF runs with the matched back projector only"));
    }
    let plan = RlPlan::with_otf(input.dims, otf, voxel, cfg.boundary)?;
    plan.run_with_options(input, cfg.iterations, cfg.background, &cfg.run_options(), None)
}

/// [`richardson_lucy`] with a per-iteration observer (see [`RlPlan::run`]).
pub fn richardson_lucy_with<F>(input: &Volume, psf: &Volume, cfg: &RlConfig, observe: F) -> Result<Volume>
where
    F: FnMut(usize, &Volume) -> ControlFlow<()>,
{
    let mut observe = observe;
    let plan = RlPlan::with_boundary(input.dims, psf, cfg.back_projector, cfg.boundary)?;
    Ok(plan
        .run_with_options(
            input,
            cfg.iterations,
            cfg.background,
            &cfg.run_options(),
            Some(&mut observe),
        )?
        .0)
}

/// Measures RL throughput (voxel-iterations per second) on a 64×256×256 volume of random
/// blurred spots with a 31×31×31 Gaussian PSF, after one warm-up iteration. Planning
/// (FFT plans, OTF) is not timed.
pub fn measure_throughput(iterations: usize) -> Result<RlThroughput> {
    measure_throughput_on([64, 256, 256], [31, 31, 31], iterations)
}

pub fn measure_throughput_on(dims: [usize; 3], psf_dims: [usize; 3], iterations: usize) -> Result<RlThroughput> {
    let psf = super::psf::gaussian_kernel(psf_dims, [2.0, 1.2, 1.2]);
    let img = benchmark_volume(dims);
    let plan = RlPlan::new(dims, &psf, BackProjector::Matched)?;
    plan.run_silent(&img, 1, 0.0)?;
    let t = std::time::Instant::now();
    plan.run_silent(&img, iterations, 0.0)?;
    let seconds = t.elapsed().as_secs_f64();
    let vox = dims.iter().product::<usize>() as f64;
    Ok(RlThroughput {
        dims,
        psf_dims,
        fft_grid: plan.fft_grid(),
        iterations,
        seconds,
        voxel_iterations_per_s: vox * iterations as f64 / seconds,
        threads: rayon::current_num_threads(),
    })
}

/// The deterministic test volume of the throughput measurement (also written by
/// tools/imaging/rl_peer_bench.py's counterpart): sparse bright voxels on a background of 10.
pub fn benchmark_volume(dims: [usize; 3]) -> Volume {
    let n: usize = dims.iter().product();
    let mut data = vec![10.0f32; n];
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..n / 500 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        data[(s % n as u64) as usize] += 1000.0;
    }
    Volume::new(dims, data).expect("sized")
}
