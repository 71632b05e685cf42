//! Radially averaged OTFs, the way cudaDecon (Shao/Gustafsson's `radialft`) makes them
//! from a measured bead stack, and their interpolation onto any image's frequency grid.
//!
//! Why a second route besides [`crate::imaging::measured_psf`]: cudaDecon never cleans the
//! PSF in space. It subtracts one background, transforms the raw stack, moves the bead to
//! the origin by a phase ramp, averages the spectrum over rings of equal lateral frequency
//! (so the noise floor, spread over all frequencies, averages out instead of being cut by a
//! threshold), re-estimates the kr = 0 column by a line fit through kr = 1..K (the column a
//! background error distorts), and scales the peak to 1. The data are then deconvolved with
//! that OTF interpolated onto their own frequency grid, so a bead stepped at 0.1 µm serves
//! data stepped at 0.3 µm without resampling in space. Users who compare with cudaDecon (or
//! hold its OTF files) get the same transfer function here, and [`RadialOtf::to_psf`]
//! writes it as an ordinary spatial PSF at the data's voxel size (`psf --measured
//! --via-radial-otf`), its small negative ripples set to 0.
//!
//! Layout of an OTF: `values[kr · nkz + kz]`, kr in 0..nkr (lateral frequency in units of
//! `dkr`), kz in 0..nkz (FFT order: kz > nkz/2 are the negative frequencies). cudaDecon's
//! OTF TIFF stores the same array as nkr rows of nkz interleaved (re, im) f32 pairs.

use crate::error::{Error, Result};
use crate::imaging::fft::Fft3;
use crate::imaging::Volume;
use rustfft::num_complex::{Complex32, Complex64};
use std::path::Path;

/// How [`RadialOtf::from_bead`] treats the bead stack.
#[derive(Clone, Debug)]
pub struct RadialOtfOptions {
    /// Background subtracted from every voxel; `None`: the mean of the in-focus plane
    /// (cudaDecon's estimate). Only the kr = 0 column depends on it, and that column is
    /// re-estimated by the line fit, so the choice matters little.
    pub background: Option<f64>,
    /// The kr = 0 column is extrapolated from kr = 1..=`fix_origin` (cudaDecon's
    /// `--fixorigin`, 10 by default); 0 keeps the measured column.
    pub fix_origin: usize,
    /// Added to the fitted z centre of the bead, in the bead's planes. 0 centres the bead
    /// on its parabola-fitted peak. The OTF that pycudadecon 0.5.1 ships (otf.tif) is
    /// reproduced only with +0.6: its `radialft` moves the centre by 0.6 planes.
    pub z_centre_offset: f64,
}

impl Default for RadialOtfOptions {
    fn default() -> Self {
        RadialOtfOptions {
            background: None,
            fix_origin: 10,
            z_centre_offset: 0.0,
        }
    }
}

/// A radially averaged OTF with its frequency steps.
#[derive(Clone, Debug)]
pub struct RadialOtf {
    pub nkr: usize,
    pub nkz: usize,
    /// `values[kr · nkz + kz]`, peak magnitude 1.
    pub values: Vec<Complex32>,
    /// Lateral frequency step, cycles/µm.
    pub dkr: f64,
    /// Axial frequency step, cycles/µm.
    pub dkz: f64,
}

/// The vertex of the parabola through (−1, a), (0, b), (1, c); 0 when it is flat or the
/// vertex lies beyond ±1.5 voxels (a noisy or clipped peak).
fn parabola_vertex(a: f64, b: f64, c: f64) -> f64 {
    let curve = a + c - 2.0 * b;
    if curve == 0.0 {
        return 0.0;
    }
    let p = -0.5 * (c - a) / curve;
    if p.abs() > 1.5 {
        0.0
    } else {
        p
    }
}

impl RadialOtf {
    /// The OTF of a raw bead stack with voxel size `voxel` (z, y, x in µm; y and x equal).
    pub fn from_bead(bead: &Volume, voxel: [f64; 3], opts: &RadialOtfOptions) -> Result<Self> {
        let [nz, ny, nx] = bead.dims;
        if nz < 3 || ny < 3 || nx < 3 {
            return Err(Error::invalid(format!(
                "a bead stack of {} is too small for an OTF (at least 3 voxels along each axis)",
                bead.shape_str()
            )));
        }
        if voxel.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(Error::invalid(format!(
                "the bead's voxel size {voxel:?} µm must be positive"
            )));
        }
        if (voxel[1] - voxel[2]).abs() > 0.01 * voxel[2] {
            return Err(Error::invalid(format!(
                "a radially averaged OTF needs square pixels; the bead's are {}×{} µm",
                voxel[1], voxel[2]
            )));
        }
        bead.check_finite("bead stack")?;
        // the peak voxel and its parabola-fitted sub-voxel position (periodic neighbours)
        let (mut peak, mut best) = (0usize, f32::NEG_INFINITY);
        for (i, &v) in bead.data.iter().enumerate() {
            if v > best {
                best = v;
                peak = i;
            }
        }
        let (k, i, j) = (peak / (ny * nx), (peak / nx) % ny, peak % nx);
        let at = |z: usize, y: usize, x: usize| bead.at(z, y, x) as f64;
        let m = best as f64;
        let zc =
            k as f64 + parabola_vertex(at((k + nz - 1) % nz, i, j), m, at((k + 1) % nz, i, j)) + opts.z_centre_offset;
        let yc = i as f64 + parabola_vertex(at(k, (i + ny - 1) % ny, j), m, at(k, (i + 1) % ny, j));
        let xc = j as f64 + parabola_vertex(at(k, i, (j + nx - 1) % nx), m, at(k, i, (j + 1) % nx));
        let background = match opts.background {
            Some(b) => b,
            None => {
                let plane = (zc.floor().max(0.0) as usize).min(nz - 1);
                let s: f64 = bead.data[plane * ny * nx..(plane + 1) * ny * nx]
                    .iter()
                    .map(|&v| v as f64)
                    .sum();
                s / (ny * nx) as f64
            }
        };

        let fft = Fft3::new(bead.dims);
        let mut buf: Vec<f32> = bead.data.iter().map(|&v| (v as f64 - background) as f32).collect();
        let mut spec = vec![Complex32::default(); fft.spectrum_len()];
        let mut scratch = vec![Complex32::default(); fft.spectrum_len()];
        fft.forward(&mut buf, &mut spec, &mut scratch);

        // ring average of the spectrum with the bead moved to the origin
        let nkr = nx / 2 + 1;
        let mut sum = vec![Complex64::default(); nkr * nz];
        let mut count = vec![0usize; nkr * nz];
        let two_pi = 2.0 * std::f64::consts::PI;
        for (idx, v) in spec.iter().enumerate() {
            let [fz, fy, fx] = fft.freq(idx);
            // lateral radius in units of x's frequency step (y's scaled to it)
            let ky = fy as f64 * nx as f64 / ny as f64;
            let r = ((fx * fx) as f64 + ky * ky).sqrt().round() as usize;
            if r >= nkr {
                continue;
            }
            let phi = two_pi * (zc * fz as f64 / nz as f64 + yc * fy as f64 / ny as f64 + xc * fx as f64 / nx as f64);
            let kz = fz.rem_euclid(nz as i64) as usize;
            sum[r * nz + kz] += Complex64::new(v.re as f64, v.im as f64) * Complex64::from_polar(1.0, phi);
            count[r * nz + kz] += 1;
        }
        for (s, &c) in sum.iter_mut().zip(&count) {
            if c > 0 {
                *s /= c as f64;
            }
        }
        // an axially symmetric PSF's OTF is Hermitian in kz at every kr
        for kr in 0..nkr {
            let row = &mut sum[kr * nz..(kr + 1) * nz];
            row[0] = Complex64::new(row[0].re, 0.0);
            for q in 1..=nz / 2 {
                let v = (row[q] + row[nz - q].conj()) / 2.0;
                row[q] = v;
                row[nz - q] = v.conj();
            }
        }
        if opts.fix_origin > 0 {
            fix_origin(&mut sum, nkr, nz, opts.fix_origin)?;
        }
        let peak = sum.iter().map(|v| v.norm()).fold(0.0f64, f64::max);
        if !(peak > 0.0 && peak.is_finite()) {
            return Err(Error::invalid(
                "the bead stack's spectrum is zero after background subtraction: is it a bead?",
            ));
        }
        Ok(RadialOtf {
            nkr,
            nkz: nz,
            values: sum
                .iter()
                .map(|v| Complex32::new((v.re / peak) as f32, (v.im / peak) as f32))
                .collect(),
            dkr: 1.0 / (nx as f64 * voxel[2]),
            dkz: 1.0 / (nz as f64 * voxel[0]),
        })
    }

    /// Reads cudaDecon's OTF TIFF (nkr rows of nkz (re, im) pairs; a single page). Its
    /// frequency steps are not in the file: they follow from the bead's voxel size
    /// (`dz`, `dxy`, µm) and its size (nkz planes, 2·(nkr − 1) pixels).
    pub fn read_cudadecon(path: &Path, dz: f64, dxy: f64) -> Result<Self> {
        let (rows, cols, data) = read_single_page_f32(path)?;
        if cols % 2 != 0 || rows < 2 {
            return Err(Error::invalid(format!(
                "{}: not a cudaDecon OTF (expected kr rows × 2·kz float columns, found {rows}×{cols})",
                path.display()
            )));
        }
        if !(dz > 0.0 && dxy > 0.0 && dz.is_finite() && dxy.is_finite()) {
            return Err(Error::invalid("the OTF's bead voxel size must be positive"));
        }
        if data.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(format!(
                "{}: the OTF holds NaN or infinite values",
                path.display()
            )));
        }
        let (nkr, nkz) = (rows, cols / 2);
        Ok(RadialOtf {
            nkr,
            nkz,
            values: data.chunks(2).map(|p| Complex32::new(p[0], p[1])).collect(),
            dkr: 1.0 / (2.0 * (nkr - 1) as f64 * dxy),
            dkz: 1.0 / (nkz as f64 * dz),
        })
    }

    /// Writes cudaDecon's OTF TIFF layout (f32, one page).
    pub fn write_cudadecon(&self, path: &Path) -> Result<()> {
        let data: Vec<f32> = self.values.iter().flat_map(|c| [c.re, c.im]).collect();
        let v = Volume::new([1, self.nkr, 2 * self.nkz], data)?;
        crate::imaging::write_volume(path, &v, crate::imaging::OutputDtype::F32)
    }

    /// The OTF at lateral frequency `kr` and axial frequency `kz` (cycles/µm), bilinear
    /// in (kr, kz) as cudaDecon interpolates it; 0 beyond the measured band.
    pub fn at(&self, kr: f64, kz: f64) -> Complex32 {
        let r = kr / self.dkr;
        let z = kz / self.dkz;
        if r >= (self.nkr - 1) as f64 || z.abs() > (self.nkz / 2) as f64 {
            return Complex32::default();
        }
        let (r0, fr) = (r.floor() as usize, (r - r.floor()) as f32);
        let z0 = z.floor();
        let fz = (z - z0) as f32;
        let za = (z0 as i64).rem_euclid(self.nkz as i64) as usize;
        let zb = (za + 1) % self.nkz;
        let v = |r: usize, z: usize| self.values[r * self.nkz + z];
        (v(r0, za) * (1.0 - fz) + v(r0, zb) * fz) * (1.0 - fr) + (v(r0 + 1, za) * (1.0 - fz) + v(r0 + 1, zb) * fz) * fr
    }

    /// The transfer function on `fft`'s spectrum (its layout and frequencies) for an image
    /// of voxel size `voxel` (z, y, x µm), normalized to 1 at the origin.
    pub fn on_grid(&self, fft: &Fft3, voxel: [f64; 3]) -> Result<Vec<Complex32>> {
        if voxel.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(Error::invalid(format!(
                "the data's voxel size {voxel:?} µm must be positive"
            )));
        }
        let [gz, gy, gx] = fft.dims;
        let dc = self.at(0.0, 0.0);
        if !(dc.re > 0.0) {
            return Err(Error::invalid("the OTF is not positive at the origin: not an OTF"));
        }
        Ok((0..fft.spectrum_len())
            .map(|i| {
                let [fz, fy, fx] = fft.freq(i);
                let ky = fy as f64 / (gy as f64 * voxel[1]);
                let kx = fx as f64 / (gx as f64 * voxel[2]);
                let kz = fz as f64 / (gz as f64 * voxel[0]);
                self.at((kx * kx + ky * ky).sqrt(), kz) / dc.re
            })
            .collect())
    }
}

/// What [`RadialOtf::to_psf`] found and did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OtfPsfReport {
    /// The PSF's size (z, y, x) in the data's voxels.
    pub dims: [usize; 3],
    /// Sum of the negative values before clipping, relative to the sum of the positive ones.
    pub negative_mass: f64,
    /// The most negative value before clipping, relative to the peak (≤ 0).
    pub min_over_peak: f64,
}

impl RadialOtf {
    /// The size in voxels of `voxel` (z, y, x µm) of the field the OTF was measured on:
    /// 1/Δk per axis, rounded up to a whole number of voxels (at least 1).
    pub fn field_extent(&self, voxel: [f64; 3]) -> Result<[usize; 3]> {
        if voxel.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(Error::invalid(format!(
                "the data's voxel size {voxel:?} µm must be positive"
            )));
        }
        let step = [self.dkz, self.dkr, self.dkr];
        let mut n = [0usize; 3];
        for a in 0..3 {
            let field = 1.0 / (step[a] * voxel[a]);
            if !field.is_finite() || field <= 0.0 {
                return Err(Error::invalid("the OTF's frequency steps must be positive"));
            }
            // a whole number of voxels up to rounding (a bead stepped like the data)
            n[a] = ((field - 1e-6).ceil() as usize).max(1);
        }
        Ok(n)
    }

    /// [`Self::field_extent`] made odd, so the centre voxel dims/2 has as many neighbours on
    /// each side: the default size of [`Self::to_psf`].
    pub fn field_dims(&self, voxel: [f64; 3]) -> Result<[usize; 3]> {
        Ok(self.field_extent(voxel)?.map(|n| n | 1))
    }

    /// The spatial PSF this OTF stands for on a grid of voxel size `voxel` (z, y, x µm):
    /// the OTF interpolated onto the frequencies of a `dims` grid (as [`Self::on_grid`]
    /// does for the data), inverse-transformed, its origin moved to the centre voxel
    /// dims/2, negative values set to 0, normalized to sum 1. `dims` None: the field the
    /// bead was measured on ([`Self::field_dims`]).
    ///
    /// This is the PSF cudaDecon effectively deconvolves with, as an ordinary PSF file.
    /// Why the clipping: a ring-averaged, band-limited spectrum of a noisy bead is not
    /// exactly the spectrum of a non-negative function; its inverse has small negative
    /// ripples (their share is reported), and RL needs a non-negative PSF (a negative
    /// one can make the estimate negative, and [`crate::imaging::rl`] refuses it).
    /// On a grid the size of the data, before clipping, deconvolving with this PSF with
    /// periodic edges is deconvolving with the OTF itself.
    pub fn to_psf(&self, voxel: [f64; 3], dims: Option<[usize; 3]>) -> Result<(Volume, OtfPsfReport)> {
        let mut psf = self.to_psf_unclipped(voxel, dims)?;
        let (pos, neg, min, peak) = psf
            .data
            .iter()
            .fold((0.0f64, 0.0f64, 0.0f32, 0.0f32), |(p, n, lo, hi), &v| {
                if v >= 0.0 {
                    (p + v as f64, n, lo, hi.max(v))
                } else {
                    (p, n - v as f64, lo.min(v), hi)
                }
            });
        if peak <= 0.0 {
            return Err(Error::invalid("the OTF's PSF has no positive values: not an OTF"));
        }
        let report = OtfPsfReport {
            dims: psf.dims,
            negative_mass: neg / pos,
            min_over_peak: (min / peak) as f64,
        };
        psf.data.iter_mut().for_each(|v| *v = v.max(0.0));
        let s = psf.sum();
        psf.data.iter_mut().for_each(|v| *v = (*v as f64 / s) as f32);
        Ok((psf, report))
    }

    /// [`Self::to_psf`] before its negative values are set to 0 (sum 1 with them).
    pub fn to_psf_unclipped(&self, voxel: [f64; 3], dims: Option<[usize; 3]>) -> Result<Volume> {
        let dims = match dims {
            Some(d) => d,
            None => self.field_dims(voxel)?,
        };
        if dims.contains(&0) {
            return Err(Error::invalid(
                "the PSF's size must be at least 1 voxel along each axis",
            ));
        }
        let fft = Fft3::new(dims);
        let mut spec = self.on_grid(&fft, voxel)?;
        let mut scratch = vec![Complex32::default(); fft.spectrum_len()];
        let mut wrapped = vec![0.0f32; fft.real_len()];
        fft.inverse(&mut spec, &mut wrapped, &mut scratch);
        // origin (index 0) → centre voxel dims/2
        let [nz, ny, nx] = dims;
        let mut psf = Volume::zeros(dims);
        for z in 0..nz {
            for y in 0..ny {
                for x in 0..nx {
                    let i = psf.index((z + nz / 2) % nz, (y + ny / 2) % ny, (x + nx / 2) % nx);
                    psf.data[i] = wrapped[(z * ny + y) * nx + x];
                }
            }
        }
        psf.check_finite("PSF from the OTF")?;
        // on_grid puts 1 at the origin: the sum is already 1
        psf.voxel_size = Some(voxel);
        Ok(psf)
    }
}

/// cudaDecon's `fixorigin`: for every kz, the kr = 0 value becomes the intercept of a line
/// fitted through kr = 1..=k2; k2 shrinks while the DC term would not exceed kr = 1's.
fn fix_origin(otf: &mut [Complex64], nkr: usize, nkz: usize, k2: usize) -> Result<()> {
    let original: Vec<Complex64> = otf[..nkz].to_vec();
    let mut k2 = k2.min(nkr - 1);
    loop {
        if k2 < 2 {
            return Err(Error::invalid(
                "the OTF's kr = 0 column cannot be extrapolated (its peak is not at kr = 0): is the bead centred?",
            ));
        }
        let mean_k = (k2 + 1) as f64 / 2.0;
        let den: f64 = (1..=k2).map(|x| (x as f64 - mean_k).powi(2)).sum();
        for z in 0..nkz {
            let mean: Complex64 = (1..=k2).map(|x| otf[x * nkz + z]).sum::<Complex64>() / k2 as f64;
            let num: Complex64 = (1..=k2).map(|x| (otf[x * nkz + z] - mean) * (x as f64 - mean_k)).sum();
            otf[z] = mean - num / den * mean_k;
        }
        if otf[0].norm() > otf[nkz].norm() {
            return Ok(());
        }
        otf[..nkz].copy_from_slice(&original);
        k2 -= 1;
    }
}

/// The first page of a TIFF as f32 (cudaDecon's OTF files are single 2D float pages, which
/// the volume readers refuse as "not a stack").
fn read_single_page_f32(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    use tiff::decoder::{Decoder, DecodingResult};
    let what = |e: tiff::TiffError| Error::invalid(format!("{}: not a readable OTF TIFF: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    let mut dec = Decoder::new(std::io::BufReader::new(file)).map_err(what)?;
    let (w, h) = dec.dimensions().map_err(what)?;
    let data = match dec.read_image().map_err(what)? {
        DecodingResult::F32(v) => v,
        _ => {
            return Err(Error::invalid(format!(
                "{}: a cudaDecon OTF holds 32-bit floats; this TIFF does not",
                path.display()
            )))
        }
    };
    if data.len() != w as usize * h as usize {
        return Err(Error::invalid(format!(
            "{}: one sample per pixel expected",
            path.display()
        )));
    }
    Ok((h as usize, w as usize, data))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A Gaussian bead (σ in voxels) at a sub-voxel position on a constant background.
    pub(crate) fn gaussian_bead(dims: [usize; 3], centre: [f64; 3], sigma: [f64; 3], background: f32) -> Volume {
        let mut v = Volume::zeros(dims);
        for z in 0..dims[0] {
            for y in 0..dims[1] {
                for x in 0..dims[2] {
                    let d = [z as f64 - centre[0], y as f64 - centre[1], x as f64 - centre[2]];
                    let e: f64 = (0..3).map(|a| d[a] * d[a] / (2.0 * sigma[a] * sigma[a])).sum();
                    let i = v.index(z, y, x);
                    v.data[i] = background + (1000.0 * (-e).exp()) as f32;
                }
            }
        }
        v
    }

    /// A Gaussian's OTF is the Gaussian exp(−2π²σ²k²): the ring average of an off-centre
    /// bead, with its background removed and the bead moved to the origin, matches it in
    /// magnitude and has no phase left.
    #[test]
    fn gaussian_bead_gives_its_analytic_otf() {
        let (n, s) = (32usize, [1.6, 1.3, 1.3]);
        let bead = gaussian_bead([n, n, n], [15.0, 16.0, 15.0], s, 100.0);
        // kr = 0 as measured: the line fit of fix_origin is for noisy beads, a Gaussian is not linear in kr
        let opts = RadialOtfOptions {
            background: Some(100.0),
            fix_origin: 0,
            ..Default::default()
        };
        let otf = RadialOtf::from_bead(&bead, [0.2, 0.1, 0.1], &opts).unwrap();
        assert_eq!((otf.nkr, otf.nkz), (17, 32));
        assert!((otf.dkr - 1.0 / 3.2).abs() < 1e-12 && (otf.dkz - 1.0 / 6.4).abs() < 1e-12);
        let pi2 = 2.0 * std::f64::consts::PI * std::f64::consts::PI;
        let mut worst = 0.0f64;
        for kr in 0..8 {
            for kz in [0usize, 1, 2, 3, 31, 30] {
                let fz = if kz > n / 2 { kz as f64 - n as f64 } else { kz as f64 };
                let want = (-pi2 * (s[2] * s[2] * (kr * kr) as f64 + s[0] * s[0] * fz * fz) / (n * n) as f64).exp();
                let got = otf.values[kr * otf.nkz + kz];
                worst = worst.max((got.re as f64 - want).abs()).max((got.im as f64).abs());
            }
        }
        // ring binning (radii rounded to whole frequencies) is the only approximation
        assert!(worst < 0.02, "{worst}");

        // the same bead off the grid by a fraction of a voxel: centring removes the phase
        let moved = gaussian_bead([n, n, n], [15.3, 16.2, 14.8], s, 100.0);
        let m = RadialOtf::from_bead(&moved, [0.2, 0.1, 0.1], &opts).unwrap();
        let phase: f64 = (0..m.nkr * 4)
            .map(|i| (m.values[(i / 4) * m.nkz + i % 4].im as f64).abs())
            .fold(0.0, f64::max);
        assert!(phase < 0.03, "{phase}");

        // on a grid: 1 at the origin, the OTF's value at the grid's frequencies, 0 beyond
        let fft = Fft3::new([16, 16, 16]);
        let h = otf.on_grid(&fft, [0.4, 0.2, 0.2]).unwrap();
        assert!((h[0].re - 1.0).abs() < 1e-6 && h[0].im.abs() < 1e-6);
        // (kz, ky, kx) = (0, 0, 1) on the grid is 1/(16·0.2) = kr index 1 of the OTF
        let i = fft.spectrum_len() / fft.xc; // kx = 1, ky = 0, kz = 0 in the [kx][ky][kz] layout
        assert_eq!(fft.freq(i), [0, 0, 1]);
        assert!((h[i] - otf.values[otf.nkz] / otf.values[0].re).norm() < 1e-6);
    }

    /// Oracle for [`RadialOtf::to_psf`] alone: the analytic OTF of a Gaussian,
    /// exp(−2π²(σr²kr² + σz²kz²)), tabulated finely in kr and at the grid's own kz, back in
    /// space at 0.3 × 0.1 × 0.1 µm is the Gaussian sampled at those voxels, centred on
    /// dims/2, sum 1. σ is 1.5 voxels on every axis, so the spectrum is ~1e-5 at the
    /// Nyquist frequency (aliasing negligible); the bilinear interpolation in kr (step
    /// 1/26 µm⁻¹: relative error ≤ 2π²σr²Δkr²/4 ≈ 2e-4) is what remains.
    #[test]
    fn analytic_gaussian_otf_gives_the_sampled_gaussian() {
        let sigma_um = [0.45f64, 0.15, 0.15];
        let voxel = [0.3, 0.1, 0.1];
        let dims = [33usize, 65, 65];
        let (nkz, dkz) = (33usize, 1.0 / (33.0 * 0.3));
        let (nkr, dkr) = (200usize, 1.0 / 26.0);
        let pi2 = 2.0 * std::f64::consts::PI * std::f64::consts::PI;
        let mut values = Vec::with_capacity(nkr * nkz);
        for kr in 0..nkr {
            for kz in 0..nkz {
                let fz = if kz > nkz / 2 {
                    kz as f64 - nkz as f64
                } else {
                    kz as f64
                };
                let (r, z) = (kr as f64 * dkr, fz * dkz);
                let g = (-pi2 * (sigma_um[2].powi(2) * r * r + sigma_um[0].powi(2) * z * z)).exp();
                values.push(Complex32::new(g as f32, 0.0));
            }
        }
        let otf = RadialOtf {
            nkr,
            nkz,
            values,
            dkr,
            dkz,
        };
        let (p, r) = otf.to_psf(voxel, Some(dims)).unwrap();
        let want = crate::imaging::psf::gaussian_kernel(dims, [0, 1, 2].map(|a| sigma_um[a] / voxel[a]));
        let peak = want.data.iter().cloned().fold(0.0f32, f32::max);
        let err = p
            .data
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
            / peak;
        eprintln!(
            "analytic Gaussian OTF → PSF: max error {err:.2e} of the peak, negative mass {:.1e}",
            r.negative_mass
        );
        assert!(err < 1e-3, "{err}");
        // f32 round-off only (measured 2.4e-4 of the mass, lowest 5e-6 of the peak)
        assert!(r.negative_mass < 1e-3 && r.min_over_peak > -1e-4, "{r:?}");
        assert_eq!(p.voxel_size, Some(voxel));
        assert!((p.sum() - 1.0).abs() < 1e-5);
    }

    /// A Gaussian bead stepped at 0.1 µm, through its ring-averaged OTF ([`RadialOtf::from_bead`])
    /// and back to space at the data's 0.3 × 0.1 × 0.1 µm, is the Gaussian sampled at the
    /// data's voxels, centred on dims/2; a z centre offset of 3 bead planes (one data plane)
    /// moves it by one plane towards lower z. Here the ring binning (radii rounded to whole
    /// frequencies: the OTF 0.5–0.8% low at kr = 1..3) is an approximation of the method,
    /// and its ripples, clipped (1.35% of the mass), lower the renormalized peak: 2.1% of
    /// the peak measured, against 40% for a PSF one plane off.
    #[test]
    fn gaussian_bead_through_its_otf_gives_the_gaussian_at_the_data_voxels() {
        let sigma_um = [0.45, 0.15, 0.15];
        let bead_voxel = [0.1, 0.1, 0.1];
        let data_voxel = [0.3, 0.1, 0.1];
        let s_bead = [0, 1, 2].map(|a| sigma_um[a] / bead_voxel[a]);
        let bead = gaussian_bead([99, 65, 65], [49.3, 32.0, 32.0], s_bead, 100.0);
        let opts = RadialOtfOptions {
            background: Some(100.0),
            fix_origin: 0,
            ..Default::default()
        };
        let otf = RadialOtf::from_bead(&bead, bead_voxel, &opts).unwrap();
        // the bead's field, 9.9 × 6.5 × 6.5 µm, in data voxels: 33 × 65 × 65, so the grid's
        // frequencies along the axes are the OTF's own samples
        assert_eq!(otf.field_dims(data_voxel).unwrap(), [33, 65, 65]);
        let (p, r) = otf.to_psf(data_voxel, None).unwrap();
        assert_eq!(p.dims, [33, 65, 65]);
        assert_eq!(p.voxel_size, Some(data_voxel));
        let want = crate::imaging::psf::gaussian_kernel(p.dims, [0, 1, 2].map(|a| sigma_um[a] / data_voxel[a]));
        let peak = want.data.iter().cloned().fold(0.0f32, f32::max);
        let worst = |got: &Volume, want: &Volume| {
            got.data
                .iter()
                .zip(&want.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max)
                / peak
        };
        let err = worst(&p, &want);

        // +3 bead planes on the z centre = the PSF one data plane lower
        let shifted = RadialOtf::from_bead(
            &bead,
            bead_voxel,
            &RadialOtfOptions {
                z_centre_offset: 3.0,
                ..opts.clone()
            },
        )
        .unwrap();
        let (ps, _) = shifted.to_psf(data_voxel, None).unwrap();
        let [nz, ny, nx] = want.dims;
        let mut lower = Volume::zeros(want.dims);
        for z in 0..nz - 1 {
            for y in 0..ny {
                for x in 0..nx {
                    let i = lower.index(z, y, x);
                    lower.data[i] = want.at(z + 1, y, x);
                }
            }
        }
        let (err_shift, err_unshifted) = (worst(&ps, &lower), worst(&ps, &want));

        // a given size: the same Gaussian on a larger grid
        let (pb, _) = otf.to_psf(data_voxel, Some([37, 69, 69])).unwrap();
        let wb = crate::imaging::psf::gaussian_kernel([37, 69, 69], [0, 1, 2].map(|a| sigma_um[a] / data_voxel[a]));
        let err_big = worst(&pb, &wb);
        eprintln!(
            "Gaussian through its OTF, max error of the peak: {err:.2e} (negative mass {:.2e}, min {:.2e}); \
             z centre +3 planes vs one plane lower {err_shift:.2e}, vs unmoved {err_unshifted:.2e}; on 37×69×69 {err_big:.2e}",
            r.negative_mass, r.min_over_peak
        );
        assert!(err < 0.03, "{err}");
        assert!((p.sum() - 1.0).abs() < 1e-5);
        assert!(r.negative_mass < 0.02 && r.min_over_peak > -1e-3, "{r:?}");
        assert!(err_shift < 0.03, "{err_shift}");
        assert!(err_unshifted > 0.2, "{err_unshifted}");
        assert!(err_big < 0.03, "{err_big}");
        assert!(otf.to_psf(data_voxel, Some([0, 3, 3])).is_err());
        assert!(otf.to_psf([0.3, 0.0, 0.1], None).is_err());
    }

    /// The clipping, against its analytic oracle: an OTF 1 at kz = 0 and 0.75 at kz = ±1 on
    /// an 8-plane line is the PSF (1 + 1.5 cos(2πd/8))/8 at offsets d from the centre,
    /// negative at d = ±3 (−0.0607/8) and d = 4 (−0.5/8): negative mass 0.621/8.621, lowest
    /// −0.5/2.5 of the peak; the PSF written is the positive part over 8.621/8.
    #[test]
    fn negative_ripples_are_reported_and_set_to_zero() {
        let (n, a) = (8usize, 0.75f32);
        let mut row = vec![Complex32::default(); n];
        row[0] = Complex32::new(1.0, 0.0);
        row[1] = Complex32::new(a, 0.0);
        row[n - 1] = Complex32::new(a, 0.0);
        let otf = RadialOtf {
            nkr: 2,
            nkz: n,
            values: [row.clone(), row].concat(),
            dkr: 1.0,
            dkz: 1.0 / (n as f64 * 0.3),
        };
        let (p, r) = otf.to_psf([0.3, 0.1, 0.1], Some([n, 1, 1])).unwrap();
        let raw: Vec<f64> = (0..n)
            .map(|z| {
                let d = z as f64 - (n / 2) as f64;
                (1.0 + 2.0 * a as f64 * (2.0 * std::f64::consts::PI * d / n as f64).cos()) / n as f64
            })
            .collect();
        let pos: f64 = raw.iter().filter(|&&v| v > 0.0).sum();
        let neg: f64 = -raw.iter().filter(|&&v| v < 0.0).sum::<f64>();
        assert!((r.negative_mass - neg / pos).abs() < 1e-5, "{r:?} vs {}", neg / pos);
        assert!((r.negative_mass - 0.0720).abs() < 1e-3, "{r:?}");
        assert!((r.min_over_peak + 0.2).abs() < 1e-5, "{r:?}");
        for (z, (&got, &want)) in p.data.iter().zip(&raw).enumerate() {
            assert!(
                (got as f64 - want.max(0.0) / pos).abs() < 1e-6,
                "plane {z}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn bad_beads_and_files_are_refused() {
        let flat = Volume::zeros([8, 8, 8]);
        assert!(RadialOtf::from_bead(&flat, [0.2, 0.1, 0.1], &RadialOtfOptions::default()).is_err());
        let bead = gaussian_bead([8, 8, 8], [4.0, 4.0, 4.0], [1.0, 1.0, 1.0], 0.0);
        assert!(RadialOtf::from_bead(&bead, [0.2, 0.1, 0.3], &RadialOtfOptions::default()).is_err());
        assert!(RadialOtf::from_bead(&bead, [0.0, 0.1, 0.1], &RadialOtfOptions::default()).is_err());
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.tif");
        let e = RadialOtf::read_cudadecon(&missing, 0.1, 0.1).unwrap_err().to_string();
        assert!(e.contains("none.tif"), "{e}");
    }
}
