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
//! hold its OTF files) get the same transfer function here.
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
mod tests {
    use super::*;

    /// A Gaussian bead (σ in voxels) at a sub-voxel position on a constant background.
    fn gaussian_bead(dims: [usize; 3], centre: [f64; 3], sigma: [f64; 3], background: f32) -> Volume {
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
