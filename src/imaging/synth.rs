//! Synthetic training pairs: the phantom families of the RLN authors (rln-spec.md §6)
//! plus filaments, blurred by a PSF, with Poisson and read noise.
//!
//! Per volume of the authors' 128³ (counts scale with volume): 100 solid spheres
//! (radius 4–7), 100 ellipsoidal shells (semi-axes 4–7, 0.8 ≤ normalized radius² ≤ 1.3),
//! 50 dots (2×2×2), 50 rods along each axis (length 1–9), 50 thin plates in each axis
//! pair (sides 1–9), 50 blocks (sides 1–5), and 20 filaments (smooth random 3D curves,
//! tube radius 0.5–1.2, length 30–120 voxels); intensities uniform in [50, 850),
//! everything on a background of 30. Ground truth: that scene blurred by a 5×5×5
//! Gaussian of σ = 0.7. Input: Poisson(photons · (ground truth ⊛ PSF)) + N(0, read_noise²).
//!
//! The scene is drawn on the image grown by the PSF (Ω' of [`super::rl`]), so structures
//! just outside the field of view blur into it and nothing wraps around. A pair depends
//! only on its seed (not on the thread count).

use super::io::{write_volume, OutputDtype};
use super::progress;
use super::psf::gaussian_kernel;
use super::rl::{BackProjector, RlPlan};
use super::volume::{dims_str, Volume};
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Poisson};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A kind of phantom structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    Spheres,
    Shells,
    Dots,
    Rods,
    Plates,
    Blocks,
    Filaments,
}

impl Family {
    pub const ALL: [Family; 7] = [
        Family::Spheres,
        Family::Shells,
        Family::Dots,
        Family::Rods,
        Family::Plates,
        Family::Blocks,
        Family::Filaments,
    ];

    /// Objects per 128³ voxels.
    pub fn per_128_cubed(self) -> f64 {
        match self {
            Family::Spheres | Family::Shells => 100.0,
            Family::Dots | Family::Blocks => 50.0,
            Family::Rods | Family::Plates => 150.0,
            Family::Filaments => 20.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Spheres => "spheres",
            Family::Shells => "shells",
            Family::Dots => "dots",
            Family::Rods => "rods",
            Family::Plates => "plates",
            Family::Blocks => "blocks",
            Family::Filaments => "filaments",
        }
    }
}

impl std::str::FromStr for Family {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Family::ALL
            .into_iter()
            .find(|f| f.name() == s.trim().to_lowercase())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown phantom family {s:?}; choose from {}",
                    Family::ALL.map(|f| f.name()).join(", ")
                ))
            })
    }
}

/// How pairs are made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SynthConfig {
    /// Ground-truth size (z, y, x).
    pub size: [usize; 3],
    /// Photons per unit of ground truth (the authors': 5).
    pub photons: f64,
    /// Gaussian read noise σ in photons (the authors': 0.5).
    pub read_noise: f64,
    /// Constant added to the scene (the authors': 30).
    pub background: f32,
    /// Object intensities are uniform in [lo, hi).
    pub intensity: [f32; 2],
    /// Families drawn (duplicates ignored).
    pub families: Vec<Family>,
    /// Axial downsampling of the input (1: isotropic). The input keeps every k-th plane.
    pub anisotropic_factor: usize,
    /// With anisotropic_factor > 1: interpolate the input back to the ground truth's
    /// size (linear in z), so that input and ground truth have one shape.
    pub upsample_input: bool,
    /// Multiplies every family's object count (1: the authors' density).
    pub density: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            size: [128, 128, 128],
            photons: 5.0,
            read_noise: 0.5,
            background: 30.0,
            intensity: [50.0, 850.0],
            families: Family::ALL.to_vec(),
            anisotropic_factor: 1,
            upsample_input: true,
            density: 1.0,
        }
    }
}

impl SynthConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.density > 0.0 && self.density.is_finite()) {
            return Err(Error::invalid(format!(
                "object density {} must be positive",
                self.density
            )));
        }
        if self.size.iter().any(|&d| d < 4) {
            return Err(Error::invalid(format!(
                "synthetic volume {} is too small (≥ 4 per axis)",
                dims_str(self.size)
            )));
        }
        let photons_ok = self.photons > 0.0 && self.photons.is_finite();
        let read_noise_ok = self.read_noise >= 0.0 && self.read_noise.is_finite();
        if !(photons_ok && read_noise_ok) {
            return Err(Error::invalid("photons must be > 0 and read noise ≥ 0"));
        }
        if !self.background.is_finite() {
            return Err(Error::invalid(format!("background {} must be finite", self.background)));
        }
        if !(self.intensity[0] >= 0.0 && self.intensity[1] > self.intensity[0] && self.intensity[1].is_finite()) {
            return Err(Error::invalid("intensity range must satisfy 0 ≤ lo < hi"));
        }
        if self.families.is_empty() {
            return Err(Error::invalid(
                "no phantom family left to draw (check --families / --exclude-family)",
            ));
        }
        if self.anisotropic_factor == 0 || self.anisotropic_factor > self.size[0] {
            return Err(Error::invalid("anisotropic factor must be between 1 and the z size"));
        }
        Ok(())
    }
}

/// splitmix64: independent seeds from one seed and an index.
pub fn mix_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed
        ^ index
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Makes pairs for one configuration and one PSF (FFT plan and PSF spectrum built once).
pub struct Synthesizer {
    pub cfg: SynthConfig,
    plan: RlPlan,
    psf_voxel_size: Option<[f64; 3]>,
}

impl Synthesizer {
    pub fn new(cfg: &SynthConfig, psf: &Volume) -> Result<Self> {
        cfg.validate()?;
        let plan = RlPlan::new(cfg.size, psf, BackProjector::Matched)?;
        Ok(Synthesizer {
            cfg: cfg.clone(),
            plan,
            psf_voxel_size: psf.voxel_size,
        })
    }

    /// (input, ground truth) for `seed`.
    pub fn make_pair(&self, seed: u64) -> Result<(Volume, Volume)> {
        let cfg = &self.cfg;
        let ext = self.plan.extended_dims();
        let scene = phantom(cfg, ext, seed);
        let gt_ext = blur_gaussian_5(&scene);
        let off = self.plan.image_offset();
        let mut gt = gt_ext.crop(off, cfg.size)?;
        let blurred = self.plan.blur_extended(&gt_ext)?;
        let k = cfg.anisotropic_factor;
        let mut input = if k > 1 {
            take_every_kth_plane(&blurred, k)
        } else {
            blurred
        };
        add_noise(&mut input, cfg.photons, cfg.read_noise, mix_seed(seed, 0x004E_015E));
        if k > 1 && cfg.upsample_input {
            input = upsample_z_linear(&input, k, cfg.size[0]);
        }
        if let Some(vs) = self.psf_voxel_size {
            gt.voxel_size = Some(vs);
            input.voxel_size = Some(if k > 1 && !cfg.upsample_input {
                [vs[0] * k as f64, vs[1], vs[2]]
            } else {
                vs
            });
        }
        let meta = serde_json::json!({ "synthetic": { "seed": seed, "families": families_of(cfg) } }).to_string();
        gt.metadata = Some(meta.clone());
        input.metadata = Some(meta);
        gt.unit = "micron".into();
        input.unit = "micron".into();
        gt.check_finite_result("synthetic ground truth")?;
        input.check_finite_result("synthetic input")?;
        Ok((input, gt))
    }
}

fn families_of(cfg: &SynthConfig) -> Vec<&'static str> {
    let mut f = cfg.families.clone();
    f.sort();
    f.dedup();
    f.into_iter().map(|f| f.name()).collect()
}

/// (input, ground truth) for `seed`: see the module documentation.
pub fn make_pair(cfg: &SynthConfig, psf: &Volume, seed: u64) -> Result<(Volume, Volume)> {
    Synthesizer::new(cfg, psf)?.make_pair(seed)
}

/// Writes `count` pairs as `dir/input/synth_NNNN.tif` and `dir/ground_truth/synth_NNNN.tif`
/// (float32, pair i from seed `mix_seed(seed, i)`) and `dir/synth.json` (the settings).
pub fn write_dataset(cfg: &SynthConfig, psf: &Volume, dir: &Path, count: usize, seed: u64) -> Result<Vec<PathBuf>> {
    let s = Synthesizer::new(cfg, psf)?;
    let (din, dgt) = (dir.join("input"), dir.join("ground_truth"));
    for d in [&din, &dgt] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let pb = progress::bar(count as u64, "synth");
    let mut names = Vec::with_capacity(count);
    for i in 0..count {
        let (input, gt) = s.make_pair(mix_seed(seed, i as u64))?;
        let name = format!("synth_{i:04}.tif");
        write_volume(dgt.join(&name), &gt, OutputDtype::F32)?;
        write_volume(din.join(&name), &input, OutputDtype::F32)?;
        names.push(PathBuf::from(name));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let info = serde_json::json!({
        "config": cfg,
        "count": count,
        "seed": seed,
        "pair_seed": "mix_seed(seed, index) (splitmix64)",
        "psf": psf.metadata.as_deref().and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok()),
        "psf_shape": psf.dims,
        "voxel_size": psf.voxel_size,
    });
    crate::fsutil::write_atomic(
        &dir.join("synth.json"),
        serde_json::to_string_pretty(&info).unwrap_or_default().as_bytes(),
    )?;
    Ok(names)
}

/// The unblurred scene (background included) on a grid of `dims`.
pub fn phantom(cfg: &SynthConfig, dims: [usize; 3], seed: u64) -> Volume {
    let mut v = Volume::zeros(dims);
    v.data.iter_mut().for_each(|x| *x = cfg.background);
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, 0x5CE7E));
    let scale = cfg.density * dims.iter().product::<usize>() as f64 / (128f64 * 128.0 * 128.0);
    let mut fams = cfg.families.clone();
    fams.sort();
    fams.dedup();
    let d = [dims[0] as f64, dims[1] as f64, dims[2] as f64];
    for fam in fams {
        let mean = fam.per_128_cubed() * scale;
        let n = mean.floor() as usize + usize::from(rng.random::<f64>() < mean.fract());
        for j in 0..n {
            let inten = rng.random_range(cfg.intensity[0]..cfg.intensity[1]);
            let c = [
                rng.random::<f64>() * d[0],
                rng.random::<f64>() * d[1],
                rng.random::<f64>() * d[2],
            ];
            match fam {
                Family::Spheres => {
                    let r = rng.random_range(4.0..=7.0);
                    fill_ellipsoid(&mut v, c, [r, r, r], 0.0, 1.0, inten);
                }
                Family::Shells => {
                    let s = [
                        rng.random_range(4.0..=7.0),
                        rng.random_range(4.0..=7.0),
                        rng.random_range(4.0..=7.0),
                    ];
                    fill_ellipsoid(&mut v, c, s, 0.8, 1.3, inten);
                }
                Family::Dots => fill_box(&mut v, corner(c), [2, 2, 2], inten),
                Family::Rods => {
                    let mut size = [1, 1, 1];
                    size[j % 3] = rng.random_range(1..=9);
                    fill_box(&mut v, corner(c), size, inten);
                }
                Family::Plates => {
                    let mut size = [
                        rng.random_range(1..=9),
                        rng.random_range(1..=9),
                        rng.random_range(1..=9),
                    ];
                    size[j % 3] = 1; // plate normal to axis j%3: sides in the other two axes
                    fill_box(&mut v, corner(c), size, inten);
                }
                Family::Blocks => {
                    let size = [
                        rng.random_range(1..=5),
                        rng.random_range(1..=5),
                        rng.random_range(1..=5),
                    ];
                    fill_box(&mut v, corner(c), size, inten);
                }
                Family::Filaments => fill_filament(&mut v, c, &mut rng, inten),
            }
        }
    }
    v
}

fn corner(c: [f64; 3]) -> [i64; 3] {
    [c[0].floor() as i64, c[1].floor() as i64, c[2].floor() as i64]
}

fn fill_box(v: &mut Volume, at: [i64; 3], size: [usize; 3], val: f32) {
    for z in at[0]..at[0] + size[0] as i64 {
        for y in at[1]..at[1] + size[1] as i64 {
            for x in at[2]..at[2] + size[2] as i64 {
                if let Some(i) = idx(v, z, y, x) {
                    v.data[i] += val;
                }
            }
        }
    }
}

fn idx(v: &Volume, z: i64, y: i64, x: i64) -> Option<usize> {
    let d = v.dims;
    if z < 0 || y < 0 || x < 0 || z >= d[0] as i64 || y >= d[1] as i64 || x >= d[2] as i64 {
        None
    } else {
        Some(v.index(z as usize, y as usize, x as usize))
    }
}

/// Voxels whose normalized radius² Σ((p − c)/s)² lies in [lo, hi] get `val` added.
fn fill_ellipsoid(v: &mut Volume, c: [f64; 3], s: [f64; 3], lo: f64, hi: f64, val: f32) {
    let ext = [0, 1, 2].map(|a| (s[a] * hi.sqrt()).ceil() as i64 + 1);
    let ci = corner(c);
    for z in ci[0] - ext[0]..=ci[0] + ext[0] {
        for y in ci[1] - ext[1]..=ci[1] + ext[1] {
            for x in ci[2] - ext[2]..=ci[2] + ext[2] {
                let p = [z as f64 + 0.5, y as f64 + 0.5, x as f64 + 0.5];
                let q: f64 = (0..3).map(|a| ((p[a] - c[a]) / s[a]).powi(2)).sum();
                if q >= lo && q <= hi {
                    if let Some(i) = idx(v, z, y, x) {
                        v.data[i] += val;
                    }
                }
            }
        }
    }
}

/// A smooth random curve (persistent random walk, steps of 0.5 voxel) drawn as a tube
/// with an anti-aliased cross-section.
fn fill_filament(v: &mut Volume, start: [f64; 3], rng: &mut ChaCha8Rng, val: f32) {
    let radius: f64 = rng.random_range(0.5..1.2);
    let length: f64 = rng.random_range(30.0..120.0);
    let normal = Normal::new(0.0, 1.0).expect("σ = 1");
    let mut dir = [normal.sample(rng), normal.sample(rng), normal.sample(rng)];
    let norm = |d: &mut [f64; 3]| {
        let n = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt().max(1e-12);
        d.iter_mut().for_each(|x| *x /= n);
    };
    norm(&mut dir);
    let mut p = start;
    let mut w: HashMap<usize, f32> = HashMap::new();
    let step = 0.5;
    let reach = (radius + 1.0).ceil() as i64;
    for _ in 0..(length / step) as usize {
        // bend: small random change of direction each step (persistence length ≈ 20 voxels)
        for d in dir.iter_mut() {
            *d += 0.16 * normal.sample(rng);
        }
        norm(&mut dir);
        for a in 0..3 {
            p[a] += step * dir[a];
        }
        let c = corner(p);
        for z in c[0] - reach..=c[0] + reach {
            for y in c[1] - reach..=c[1] + reach {
                for x in c[2] - reach..=c[2] + reach {
                    let dd = ((z as f64 + 0.5 - p[0]).powi(2)
                        + (y as f64 + 0.5 - p[1]).powi(2)
                        + (x as f64 + 0.5 - p[2]).powi(2))
                    .sqrt();
                    let cov = (radius + 0.5 - dd).clamp(0.0, 1.0) as f32;
                    if cov > 0.0 {
                        if let Some(i) = idx(v, z, y, x) {
                            let e = w.entry(i).or_insert(0.0);
                            *e = e.max(cov);
                        }
                    }
                }
            }
        }
    }
    for (i, c) in w {
        v.data[i] += val * c;
    }
}

/// The authors' ground-truth blur: 5×5×5 Gaussian, σ = 0.7, normalized, mirrored edges.
pub fn blur_gaussian_5(v: &Volume) -> Volume {
    let k = gaussian_kernel([1, 1, 5], [1.0, 1.0, 0.7]);
    let taps: Vec<f32> = k.data.clone();
    let mut cur = v.clone();
    for axis in 0..3 {
        cur = convolve_axis(&cur, axis, &taps);
    }
    cur
}

/// 1D convolution with an odd symmetric kernel along `axis`, mirrored ('reflect') edges.
pub(crate) fn convolve_axis(v: &Volume, axis: usize, taps: &[f32]) -> Volume {
    let [nz, ny, nx] = v.dims;
    let r = (taps.len() / 2) as i64;
    let mut out = v.clone();
    let n = v.dims[axis] as i64;
    let stride = [ny * nx, nx, 1][axis];
    out.data.par_chunks_mut(ny * nx).enumerate().for_each(|(z, plane)| {
        for y in 0..ny {
            for x in 0..nx {
                let pos = [z, y, x][axis] as i64;
                let base = (z * ny + y) * nx + x - pos as usize * stride;
                let mut acc = 0.0f32;
                for (t, &w) in taps.iter().enumerate() {
                    let j = super::metrics::reflect(pos + t as i64 - r, n);
                    acc += w * v.data[base + j * stride];
                }
                plane[y * nx + x] = acc;
            }
        }
    });
    let _ = nz;
    out
}

fn take_every_kth_plane(v: &Volume, k: usize) -> Volume {
    let [nz, ny, nx] = v.dims;
    let planes = nz.div_ceil(k);
    let mut data = Vec::with_capacity(planes * ny * nx);
    for z in (0..nz).step_by(k) {
        data.extend_from_slice(&v.data[z * ny * nx..(z + 1) * ny * nx]);
    }
    let mut o = Volume::new([planes, ny, nx], data).expect("sized");
    o.voxel_size = v.voxel_size;
    o
}

/// Linear interpolation in z of planes sampled at z = 0, k, 2k, … back onto `nz` planes.
fn upsample_z_linear(v: &Volume, k: usize, nz: usize) -> Volume {
    let [mz, ny, nx] = v.dims;
    let plane = ny * nx;
    let mut data = vec![0.0f32; nz * plane];
    data.par_chunks_mut(plane).enumerate().for_each(|(z, out)| {
        let pos = z as f64 / k as f64;
        let z0 = (pos.floor() as usize).min(mz - 1);
        let z1 = (z0 + 1).min(mz - 1);
        let f = (pos - z0 as f64).min(1.0) as f32;
        let (a, b) = (
            &v.data[z0 * plane..(z0 + 1) * plane],
            &v.data[z1 * plane..(z1 + 1) * plane],
        );
        for i in 0..plane {
            out[i] = a[i] * (1.0 - f) + b[i] * f;
        }
    });
    Volume::new([nz, ny, nx], data).expect("sized")
}

/// Poisson(photons · v) + N(0, read_noise²), each plane from its own seeded stream.
fn add_noise(v: &mut Volume, photons: f64, read_noise: f64, seed: u64) {
    let plane = v.dims[1] * v.dims[2];
    v.data.par_chunks_mut(plane).enumerate().for_each(|(z, p)| {
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, z as u64));
        let gauss = Normal::new(0.0, read_noise.max(0.0)).ok();
        for x in p.iter_mut() {
            let lam = photons * (*x as f64).max(0.0);
            let mut s = if lam > 0.0 {
                Poisson::new(lam).map(|d| d.sample(&mut rng)).unwrap_or(lam)
            } else {
                0.0
            };
            if read_noise > 0.0 {
                if let Some(g) = &gauss {
                    s += g.sample(&mut rng);
                }
            }
            *x = s as f32;
        }
    });
}
