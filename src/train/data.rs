//! Training data: pairs of (input, ground truth) volumes from a folder or made on the
//! fly from a PSF, and the authors' crop sampler (rln-spec.md §6).

use crate::error::{Error, Result};
use crate::imaging::io::read_volume;
use crate::imaging::normalize::{normalize_ground_truth, normalize_percentile_in_place, percentile_affine};
use crate::imaging::synth::{mix_seed, Family, SynthConfig, Synthesizer};
use crate::imaging::volume::{dims_str, Volume};
use crate::model::{FixedNorm, Variant};
use crate::tensor::{Shape, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One training pair; `inputs` holds one view, or two for RLN-dual.
#[derive(Clone, Debug)]
pub struct Pair {
    pub name: String,
    pub inputs: Vec<Volume>,
    pub ground_truth: Volume,
    /// Mean of the raw ground truth (the foreground-rejection reference).
    pub gt_mean: f64,
    /// Per view, sum of the input / sum of the ground truth: the acquisition's gain,
    /// since a normalized PSF keeps the total flux (used by [`TargetScale::InputFlux`]).
    pub flux_ratios: Vec<f64>,
}

#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub pairs: Vec<Pair>,
}

fn tiff_names(dir: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            let l = n.to_lowercase();
            !n.starts_with('.')
                && (l.ends_with(".tif") || l.ends_with(".tiff") || l.ends_with(".h5") || l.ends_with(".hdf5"))
        })
        .collect();
    v.sort();
    Ok(v)
}

fn check_usable(v: &Volume, what: &str) -> Result<()> {
    v.check_finite(what)?;
    let (lo, hi) = v
        .data
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    if lo == hi {
        return Err(Error::invalid(format!(
            "{what} is constant ({lo} everywhere): it cannot be normalized or learned from"
        )));
    }
    Ok(())
}

impl Pair {
    pub fn new(name: String, inputs: Vec<Volume>, ground_truth: Volume) -> Result<Self> {
        for (i, v) in inputs.iter().enumerate() {
            if v.dims != ground_truth.dims {
                return Err(Error::Shape(format!(
                    "pair {name}: input{} is {} but the ground truth is {}",
                    if i == 0 {
                        String::new()
                    } else {
                        format!(" view {}", i + 1)
                    },
                    v.shape_str(),
                    ground_truth.shape_str()
                )));
            }
            check_usable(v, &format!("{name}: input"))?;
        }
        check_usable(&ground_truth, &format!("{name}: ground truth"))?;
        let gt_sum = ground_truth.sum();
        let gt_mean = gt_sum / ground_truth.len() as f64;
        let flux_ratios = inputs.iter().map(|v| v.sum() / gt_sum).collect();
        Ok(Pair {
            name,
            inputs,
            ground_truth,
            gt_mean,
            flux_ratios,
        })
    }
}

/// How synthetic training volumes vary from one to the next (beyond their seed).
#[derive(Clone, Debug, Default)]
pub struct SynthVariation {
    /// Object density drawn log-uniformly from (low, high) per volume.
    pub density: Option<(f64, f64)>,
    /// Photons per unit of ground truth drawn log-uniformly from (low, high) per volume.
    pub photons: Option<(f64, f64)>,
    /// This fraction of the volumes (drawn per volume) holds a random non-empty subset
    /// of the families, the others all of them (None: all in every volume). With all
    /// families in every volume, the brightest structures of a crop are always large
    /// objects (thin ones lose most of their peak to the blur), so the network can learn
    /// "brightest after normalization means large" and under-sharpen a scene of thin
    /// structures only, whose percentile normalization maps them to the top of the range.
    pub family_subsets: Option<f64>,
}

/// A subset with probability `fraction` (all families otherwise), each family kept with
/// probability 1/2 (its own stream per volume); never empty. Dense scenes of every family
/// stay common, so the network keeps seeing them while it learns thin-only scenes.
fn family_subset(families: &[Family], seed: u64, fraction: f64) -> Vec<Family> {
    // at 1/2: a subset iff the top bit is 0 (the draws of the fixed-half version)
    if unit_draw(seed, 0xfa31_aaaa) >= fraction {
        return families.to_vec();
    }
    let mut kept: Vec<Family> = families
        .iter()
        .enumerate()
        .filter(|(k, _)| mix_seed(seed, 0xfa31_0000 + *k as u64) >> 63 == 1)
        .map(|(_, f)| *f)
        .collect();
    if kept.is_empty() && !families.is_empty() {
        kept.push(families[(mix_seed(seed, 0xfa31_ffff) % families.len() as u64) as usize]);
    }
    kept
}

impl Dataset {
    /// Pairs from `dir/input/` and `dir/ground_truth/` (and `input2_dir` for a second view),
    /// matched by file name. Every problem is reported before any volume is used.
    pub fn from_dir(dir: &Path, input2_dir: Option<&Path>) -> Result<Self> {
        let (idir, gdir) = (dir.join("input"), dir.join("ground_truth"));
        for d in [&idir, &gdir] {
            if !d.is_dir() {
                return Err(Error::invalid(format!(
                    "{} does not exist: training data must be DIR/input/ and DIR/ground_truth/ with matching file names \
                     (`rln-engine synth` makes such a folder)",
                    d.display()
                )));
            }
        }
        let (inames, gnames) = (tiff_names(&idir)?, tiff_names(&gdir)?);
        let only_i: Vec<&String> = inames.iter().filter(|n| !gnames.contains(n)).collect();
        let only_g: Vec<&String> = gnames.iter().filter(|n| !inames.contains(n)).collect();
        if !only_i.is_empty() || !only_g.is_empty() {
            return Err(Error::invalid(format!(
                "unpaired training files: {only_i:?} in {} have no ground truth, {only_g:?} in {} have no input",
                idir.display(),
                gdir.display()
            )));
        }
        if inames.is_empty() {
            return Err(Error::invalid(format!("no .tif/.tiff volumes in {}", idir.display())));
        }
        if let Some(d2) = input2_dir {
            if !d2.is_dir() {
                return Err(Error::invalid(format!(
                    "{} does not exist: a dual-view model needs the second view of every input there (same file names)",
                    d2.display()
                )));
            }
            let n2 = tiff_names(d2)?;
            let missing: Vec<&String> = inames.iter().filter(|n| !n2.contains(n)).collect();
            if !missing.is_empty() {
                return Err(Error::invalid(format!(
                    "second view missing for {missing:?} in {}",
                    d2.display()
                )));
            }
        }
        let pairs = inames
            .par_iter()
            .map(|n| {
                let mut inputs = vec![read_volume(idir.join(n))?];
                if let Some(d2) = input2_dir {
                    inputs.push(read_volume(d2.join(n))?);
                }
                Pair::new(n.clone(), inputs, read_volume(gdir.join(n))?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Dataset { pairs })
    }

    /// `count` synthetic pairs for `psf` (pair i from seed mix_seed(seed, i)), each varied
    /// by `vary` (density, photon level, family subset: drawn deterministically from the
    /// pair's seed), so the network sees sparse and crowded, dim and bright scenes.
    pub fn synthetic(cfg: &SynthConfig, psf: &Volume, count: usize, seed: u64, vary: &SynthVariation) -> Result<Self> {
        // ranges are checked once, before any volume is made
        if count == 0 {
            return Err(Error::invalid(
                "0 synthetic training volumes asked for (--synth-count): give at least 1",
            ));
        }
        if let Some(f) = vary.family_subsets {
            if !(0.0..=1.0).contains(&f) {
                return Err(Error::invalid(format!("family-subset fraction {f} must lie in 0..1")));
            }
        }
        for (range, what) in [(vary.density, "density"), (vary.photons, "photons")] {
            if let Some((lo, hi)) = range {
                if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
                    return Err(Error::invalid(format!(
                        "{what} range {lo}..{hi} must satisfy 0 < low ≤ high"
                    )));
                }
            }
        }
        let mut s = Synthesizer::new(cfg, psf)?;
        let mut pairs = Vec::with_capacity(count);
        // log-uniform draw from (lo, hi), its own stream per (pair, quantity)
        let draw = |sd: u64, tag: u64, (lo, hi): (f64, f64)| -> f64 { lo * (hi / lo).powf(unit_draw(sd, tag)) };
        for i in 0..count {
            let sd = mix_seed(seed, i as u64);
            if let Some(r) = vary.density {
                s.cfg.density = draw(sd, 0xde75, r);
            }
            if let Some(r) = vary.photons {
                s.cfg.photons = draw(sd, 0x9407_0125, r);
            }
            if let Some(fraction) = vary.family_subsets {
                s.cfg.families = family_subset(&cfg.families, sd, fraction);
            }
            let (input, gt) = s.make_pair(sd)?;
            pairs.push(Pair::new(format!("synth_{i:04}"), vec![input], gt)?);
        }
        Ok(Dataset { pairs })
    }

    pub fn views(&self) -> usize {
        self.pairs.first().map(|p| p.inputs.len()).unwrap_or(1)
    }

    /// Names and sizes, to recognize the same data when resuming.
    pub fn fingerprint(&self) -> Vec<(String, [usize; 3])> {
        self.pairs
            .iter()
            .map(|p| (p.name.clone(), p.ground_truth.dims))
            .collect()
    }

    /// Checks that every pair can hold a crop of `crop` voxels.
    pub fn check_crop(&self, crop: [usize; 3]) -> Result<()> {
        if self.pairs.is_empty() {
            return Err(Error::invalid("the training data holds no pairs"));
        }
        for p in &self.pairs {
            let d = p.ground_truth.dims;
            if (0..3).any(|i| d[i] < crop[i]) {
                return Err(Error::invalid(format!(
                    "pair {} is {} voxels, smaller than the {} crop: use a smaller --crop or larger volumes",
                    p.name,
                    dims_str(d),
                    dims_str(crop)
                )));
            }
        }
        Ok(())
    }
}

/// Uniform in [0, 1) from the top 53 bits of `mix_seed(seed, tag)`.
fn unit_draw(seed: u64, tag: u64) -> f64 {
    (mix_seed(seed, tag) >> 11) as f64 / (1u64 << 53) as f64
}

/// Normalized views and the affine map `(scale, offset)` applied to each.
pub type ViewsAndMaps = (Vec<Vec<f32>>, Vec<(f64, f64)>);

/// Percentile-normalizes each view (spec §6), or maps it by the `fixed` normalization,
/// and returns them with the affine map applied to each, which [`TargetScale::target`]
/// needs.
pub fn normalize_views(views: Vec<Vec<f32>>, percentiles: [f64; 2], fixed: Option<&FixedNorm>) -> Result<ViewsAndMaps> {
    let mut affines = Vec::with_capacity(views.len());
    let mut out = Vec::with_capacity(views.len());
    for mut x in views {
        if let Some(f) = fixed {
            let (s, o) = f.affine();
            x.iter_mut().for_each(|v| *v = (*v as f64 * s + o) as f32);
            affines.push((s, o));
            out.push(x);
            continue;
        }
        let (lo, hi) = normalize_percentile_in_place(&mut x, percentiles[0], percentiles[1])?;
        affines.push(percentile_affine(lo, hi));
        out.push(x);
    }
    Ok((out, affines))
}

/// How a crop's ground truth is scaled into a training target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TargetScale {
    /// The authors' (§6): `max(0, normalize(g))` with the ground truth's own
    /// percentiles. The ratio of target to input scale then depends on what else is in
    /// the crop (a thin structure's target is ~1 whether it is the brightest thing in
    /// the crop or sits beside large objects that set the input's percentiles), which
    /// the network cannot see locally.
    #[default]
    Own,
    /// The ground truth times the pair's flux ratio (input sum / ground-truth sum),
    /// then the input crop's own normalization map, clipped at 0: the target is what
    /// the input would read without blur and noise, in the input's normalized units,
    /// so the required gain no longer depends on the crop's other content. Needs pairs
    /// whose ground truth holds the input's total flux (true of synthetic pairs: the
    /// background is part of the ground truth).
    InputFlux,
}

impl TargetScale {
    /// The target for ground-truth crop `g` of `pair`, whose input view i was
    /// normalized by `v' = v·scale_i + offset_i` (`input_affines[i]`). With two views
    /// the flux target is in the units of their mean (the dual networks' input past
    /// the first convs): `g·mean(ratio_i·scale_i) + mean(offset_i)`.
    pub fn target(self, g: &[f32], pair: &Pair, input_affines: &[(f64, f64)]) -> Result<Vec<f32>> {
        match self {
            TargetScale::Own => normalize_ground_truth(g),
            TargetScale::InputFlux => {
                if input_affines.len() != pair.flux_ratios.len() || input_affines.is_empty() {
                    return Err(Error::invalid(format!(
                        "pair {}: {} normalization maps for {} views",
                        pair.name,
                        input_affines.len(),
                        pair.flux_ratios.len()
                    )));
                }
                let n = input_affines.len() as f64;
                let s = input_affines
                    .iter()
                    .zip(&pair.flux_ratios)
                    .map(|(a, r)| r * a.0)
                    .sum::<f64>()
                    / n;
                let offset = input_affines.iter().map(|a| a.1).sum::<f64>() / n;
                Ok(g.iter().map(|&v| ((v as f64 * s + offset) as f32).max(0.0)).collect())
            }
        }
    }
}

/// The authors' sampling of training batches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CropSampler {
    pub crop: [usize; 3],
    pub batch: usize,
    /// Crop corners lie on multiples of this (8 in the authors' code).
    pub align: usize,
    /// A crop whose ground-truth mean is below `foreground_ratio` × the whole ground
    /// truth's mean is redrawn (up to `max_redraws` times).
    pub foreground_ratio: f64,
    pub max_redraws: usize,
    pub percentiles: [f64; 2],
    /// Each crop's normalized input multiplied by a factor drawn log-uniformly from
    /// (low, high); None in the authors' recipe. A whole sparse volume normalizes
    /// brighter than the crops a network was trained on (its upper percentile falls in
    /// the background); this teaches the network not to depend on that scale.
    #[serde(default)]
    pub input_scale: Option<(f64, f64)>,
    #[serde(default)]
    pub target_scale: TargetScale,
    /// The model's fixed normalization in the units of the training inputs (photons for
    /// synthetic pairs), used instead of each crop's percentiles; None: percentiles.
    #[serde(default)]
    pub fixed: Option<FixedNorm>,
}

impl Default for CropSampler {
    fn default() -> Self {
        CropSampler {
            crop: [64, 64, 64],
            batch: 4,
            align: 8,
            foreground_ratio: 0.8,
            max_redraws: 100,
            percentiles: [0.01, 99.5],
            input_scale: None,
            target_scale: TargetScale::Own,
            fixed: None,
        }
    }
}

/// A training batch: normalized input (N×C×D×H×W) and ground truth (N×1×D×H×W).
pub struct Batch {
    pub input: Tensor<f32>,
    pub ground_truth: Tensor<f32>,
    pub pair: usize,
}

impl CropSampler {
    /// Which pair step `step` uses: pairs visited in an order reshuffled every round.
    pub fn pair_for_step(&self, n_pairs: usize, step: u64, seed: u64) -> usize {
        let round = step / n_pairs as u64;
        let mut order: Vec<usize> = (0..n_pairs).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(seed ^ 0x0ddba11, round)));
        order[(step % n_pairs as u64) as usize]
    }

    fn corner(&self, rng: &mut ChaCha8Rng, len: usize, crop: usize) -> usize {
        let slack = len - crop;
        let a = self.align.max(1);
        if slack >= a {
            rng.random_range(0..=slack / a) * a
        } else {
            rng.random_range(0..=slack)
        }
    }

    /// The batch of step `step`: a pure function of (data, step, seed), so that a run
    /// resumed at any step continues exactly as the uninterrupted run would.
    pub fn batch(&self, data: &Dataset, variant: Variant, step: u64, seed: u64) -> Result<Batch> {
        let pi = self.pair_for_step(data.pairs.len(), step, seed);
        let pair = &data.pairs[pi];
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, step));
        let d = pair.ground_truth.dims;
        let c = self.crop;
        let vox = c[0] * c[1] * c[2];
        let c_in = variant.input_channels();
        let mut xs = Vec::with_capacity(self.batch * c_in * vox);
        let mut gs = Vec::with_capacity(self.batch * vox);
        if let Some((lo, hi)) = self.input_scale {
            if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
                return Err(Error::invalid(format!(
                    "input scale range {lo}..{hi} must satisfy 0 < low ≤ high"
                )));
            }
        }
        for k in 0..self.batch {
            let mut start = [0; 3];
            for _try in 0..=self.max_redraws {
                start = [
                    self.corner(&mut rng, d[0], c[0]),
                    self.corner(&mut rng, d[1], c[1]),
                    self.corner(&mut rng, d[2], c[2]),
                ];
                let g = pair.ground_truth.crop(start, c)?;
                if g.sum() / vox as f64 >= self.foreground_ratio * pair.gt_mean {
                    break;
                }
            }
            let g = pair.ground_truth.crop(start, c)?;
            let crops = pair
                .inputs
                .iter()
                .map(|v| Ok(v.crop(start, c)?.data))
                .collect::<Result<_>>()?;
            let (mut views, affines) = normalize_views(crops, self.percentiles, self.fixed.as_ref())?;
            if let Some((lo, hi)) = self.input_scale {
                // its own stream, so the crops are those of the run without scaling
                let u: f64 = ChaCha8Rng::seed_from_u64(mix_seed(mix_seed(seed ^ 0x5ca1e, step), k as u64)).random();
                let f = (lo * (hi / lo).powf(u)) as f32;
                views.iter_mut().flatten().for_each(|x| *x *= f);
            }
            match (variant, views.len()) {
                (Variant::Single, 1) => xs.extend_from_slice(&views[0]),
                (Variant::DualAverage, 2) => xs.extend(views[0].iter().zip(&views[1]).map(|(a, b)| 0.5 * (a + b))),
                (Variant::DualConcat, 2) => {
                    xs.extend_from_slice(&views[0]);
                    xs.extend_from_slice(&views[1]);
                }
                (v, n) => {
                    return Err(Error::invalid(format!(
                        "the model variant {v:?} needs {} view(s), the data has {n}",
                        v.views()
                    )))
                }
            }
            gs.extend(self.target_scale.target(&g.data, pair, &affines)?);
        }
        Ok(Batch {
            input: Tensor::from_vec(Shape::new(self.batch, c_in, c[0], c[1], c[2]), xs)?,
            ground_truth: Tensor::from_vec(Shape::new(self.batch, 1, c[0], c[1], c[2]), gs)?,
            pair: pi,
        })
    }
}
