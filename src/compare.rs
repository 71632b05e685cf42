//! RLN against classical Richardson–Lucy on held-out synthetic volumes, and the demo.
//!
//! Both methods see the same raw input; both are scored against the ground truth with
//! `eval`'s affine normalization (ground truth percentile-normalized, prediction fitted
//! by least-squares scale and offset). RLD is scored at every iteration count from
//! `rl_min` to `rl_max` and reported at its best count (best mean PSNR, best mean SSIM),
//! which favours RLD: in practice nobody knows the best count. With
//! [`RlSweep::accelerated`], Biggs–Andrews accelerated RL (cudaDecon's) is swept too, and
//! RLN must beat the stronger of the two.

use crate::error::{Error, Result};
use crate::imaging::metrics::{evaluate, Metrics, Normalize};
use crate::imaging::psf::{generate, PsfSpec};
use crate::imaging::rl::{BackProjector, RlPlan, RunOptions};
use crate::imaging::synth::{mix_seed, Family, SynthConfig, Synthesizer};
use crate::imaging::volume::Volume;
use crate::infer::deconvolve;
use crate::infer::TilePredictor;
use crate::model::{FixedNorm, Model};
use serde::Serialize;
use std::ops::ControlFlow;

/// The PSF a model was trained for, regenerated from the spec in its metadata.
pub fn model_psf(model: &Model<f32>) -> Result<(PsfSpec, Volume)> {
    let json = model.config.psf.as_ref().ok_or_else(|| {
        Error::Model(
            "the model records no PSF (it was not trained on engine-made synthetic data); give the PSF explicitly"
                .into(),
        )
    })?;
    let spec: PsfSpec = serde_json::from_value(json.clone())
        .map_err(|e| Error::Model(format!("the model's PSF record is not a PSF spec: {e}")))?;
    let psf = generate(&spec)?;
    Ok((spec, psf))
}

/// RLD metrics at every iteration count in `lo..=hi` (index i ↔ count lo + i), plain
/// or accelerated.
pub fn rl_metric_curve(
    plan: &RlPlan,
    input: &Volume,
    gt: &Volume,
    lo: usize,
    hi: usize,
    accelerate: bool,
) -> Result<Vec<Metrics>> {
    let mut curve = Vec::with_capacity(hi + 1 - lo);
    let mut err = None;
    let opts = RunOptions {
        accelerate,
        ..RunOptions::default()
    };
    let mut observe = |it: usize, est: &Volume| {
        if it >= lo {
            match evaluate(gt, est, Normalize::Affine, None) {
                Ok(m) => curve.push(m),
                Err(e) => {
                    err = Some(e);
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    };
    plan.run_with_options(input, hi, 0.0, &opts, Some(&mut observe))?;
    if let Some(e) = err {
        return Err(e);
    }
    Ok(curve)
}

/// The RL iteration counts a comparison scores, and whether accelerated RL is scored too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RlSweep {
    pub min: usize,
    pub max: usize,
    pub accelerated: bool,
}

/// One RL variant's best iteration counts over the held-out volumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RlBest {
    pub accelerated: bool,
    pub best_psnr_iterations: usize,
    pub best_ssim_iterations: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct MethodScore {
    pub method: String,
    pub psnr: f64,
    pub ssim: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    pub volumes: usize,
    pub size: [usize; 3],
    pub families: Vec<String>,
    /// Object density and photons per unit of ground truth of the volumes.
    pub density: f64,
    pub photons: f64,
    /// Read noise σ of the volumes, photons, and their scene's constant background, units.
    pub read_noise: f64,
    pub background: f32,
    /// The percentiles RLN's input was normalized with (unless `rln_fixed_norm`).
    pub rln_percentiles: [f64; 2],
    /// The model's fixed normalization, in photons (the volumes' units), when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rln_fixed_norm: Option<FixedNorm>,
    pub seeds: Vec<u64>,
    pub rows: Vec<MethodScore>,
    /// RLD iteration counts with the best mean PSNR and the best mean SSIM.
    pub rld_best_psnr_iterations: usize,
    pub rld_best_ssim_iterations: usize,
    /// Accelerated RL's best counts (with [`RlSweep::accelerated`]).
    pub rl_accelerated: Option<RlBest>,
    /// RLN's mean PSNR and SSIM beat every RL row's (plain, and accelerated if swept).
    pub rln_beats_rld: bool,
    pub per_volume: Vec<serde_json::Value>,
    /// The first held-out volume (input, RLN output, ground truth), kept so that a
    /// montage of it needs no second synthesis or prediction.
    #[serde(skip)]
    pub first_volume: Option<FirstVolume>,
}

/// The images of one held-out volume.
#[derive(Clone, Debug)]
pub struct FirstVolume {
    pub input: Volume,
    pub rln: Volume,
    pub ground_truth: Volume,
}

/// Compares RLN and RLD on `count` synthetic volumes made with seeds derived from
/// `seed` (never those of training when `seed` differs from the training seed).
#[allow(clippy::too_many_arguments)]
pub fn compare_on_synthetic(
    pred: &mut dyn TilePredictor,
    model: &Model<f32>,
    psf: &Volume,
    synth: &SynthConfig,
    count: usize,
    seed: u64,
    sweep: RlSweep,
    progress: &mut dyn FnMut(usize),
) -> Result<CompareReport> {
    let (lo, hi) = (sweep.min, sweep.max);
    if count == 0 {
        return Err(Error::invalid(
            "--count must be at least 1 (the number of held-out volumes)",
        ));
    }
    if lo == 0 || lo > hi {
        return Err(Error::invalid(format!(
            "RLD iteration range --rl-min {lo} --rl-max {hi} is empty or starts at 0: give 1 ≤ rl-min ≤ rl-max"
        )));
    }
    // the volumes are synthetic, in photons: a fixed normalization (set in the raw
    // units of the camera the model was matched to) goes back through that camera
    let in_photons;
    let model = match &model.config.norm_fixed {
        Some(f) => {
            let mut m = model.clone();
            m.config.norm_fixed = Some(f.in_photons());
            in_photons = m;
            &in_photons
        }
        None => model,
    };
    let s = Synthesizer::new(synth, psf)?;
    let plan = RlPlan::new(synth.size, psf, BackProjector::Matched)?;
    let mut rln = Vec::new();
    let mut raw = Vec::new();
    let mut curves = Vec::new();
    let mut curves_acc = Vec::new();
    let mut seeds = Vec::new();
    let mut per_volume = Vec::new();
    let mut first_volume = None;
    for i in 0..count {
        let sd = mix_seed(seed, i as u64);
        seeds.push(sd);
        let (input, gt) = s.make_pair(sd)?;
        let y = deconvolve(pred, model, &input, [256, 256, 256])?;
        let m_rln = evaluate(&gt, &y, Normalize::Affine, None)?;
        let m_raw = evaluate(&gt, &input, Normalize::Affine, None)?;
        let curve = rl_metric_curve(&plan, &input, &gt, lo, hi, false)?;
        let best = |c: &[Metrics], f: fn(&Metrics) -> f64| c.iter().map(f).fold(f64::MIN, f64::max);
        let mut row = serde_json::json!({"seed": sd, "input": [m_raw.psnr, m_raw.ssim], "rln": [m_rln.psnr, m_rln.ssim],
            "rld_best_psnr": best(&curve, |m| m.psnr), "rld_best_ssim": best(&curve, |m| m.ssim)});
        if sweep.accelerated {
            let c = rl_metric_curve(&plan, &input, &gt, lo, hi, true)?;
            row["rl_accelerated_best_psnr"] = best(&c, |m| m.psnr).into();
            row["rl_accelerated_best_ssim"] = best(&c, |m| m.ssim).into();
            curves_acc.push(c);
        }
        per_volume.push(row);
        rln.push(m_rln);
        raw.push(m_raw);
        curves.push(curve);
        if i == 0 {
            first_volume = Some(FirstVolume {
                input,
                rln: y,
                ground_truth: gt,
            });
        }
        progress(i + 1);
    }
    let n = count as f64;
    let mean = |v: &[Metrics], f: fn(&Metrics) -> f64| v.iter().map(f).sum::<f64>() / n;
    let iters = hi + 1 - lo;
    // the best counts of one RL variant, and its rows at them
    let score = |curves: &[Vec<Metrics>], name: &str| {
        let mean_at = |k: usize, f: fn(&Metrics) -> f64| curves.iter().map(|c| f(&c[k])).sum::<f64>() / n;
        let best_k = |f: fn(&Metrics) -> f64| {
            (0..iters)
                .max_by(|&a, &b| mean_at(a, f).total_cmp(&mean_at(b, f)))
                .unwrap()
        };
        let (kp, ks) = (best_k(|m| m.psnr), best_k(|m| m.ssim));
        let row = |k: usize, what: &str| MethodScore {
            method: format!("{name}, {} iterations (best mean {what})", lo + k),
            psnr: mean_at(k, |m| m.psnr),
            ssim: mean_at(k, |m| m.ssim),
        };
        (lo + kp, lo + ks, [row(kp, "PSNR"), row(ks, "SSIM")])
    };
    let (plain_psnr_k, plain_ssim_k, plain_rows) = score(&curves, "RLD");
    let mut rows = vec![MethodScore {
        method: "raw input".into(),
        psnr: mean(&raw, |m| m.psnr),
        ssim: mean(&raw, |m| m.ssim),
    }];
    rows.extend(plain_rows);
    let rl_accelerated = sweep.accelerated.then(|| {
        let (kp, ks, acc_rows) = score(&curves_acc, "RL accelerated");
        rows.extend(acc_rows);
        RlBest {
            accelerated: true,
            best_psnr_iterations: kp,
            best_ssim_iterations: ks,
        }
    });
    let rl_best_psnr = rows[1..].iter().map(|r| r.psnr).fold(f64::MIN, f64::max);
    let rl_best_ssim = rows[1..].iter().map(|r| r.ssim).fold(f64::MIN, f64::max);
    let rln_row = MethodScore {
        method: "RLN".into(),
        psnr: mean(&rln, |m| m.psnr),
        ssim: mean(&rln, |m| m.ssim),
    };
    let rln_beats_rld = rln_row.psnr > rl_best_psnr && rln_row.ssim > rl_best_ssim;
    rows.push(rln_row);
    Ok(CompareReport {
        volumes: count,
        size: synth.size,
        families: synth.families.iter().map(|f| f.name().to_string()).collect(),
        density: synth.density,
        photons: synth.photons,
        read_noise: synth.read_noise,
        background: synth.background,
        rln_percentiles: model.config.norm_percentiles,
        rln_fixed_norm: model.config.norm_fixed,
        seeds,
        rows,
        rld_best_psnr_iterations: plain_psnr_k,
        rld_best_ssim_iterations: plain_ssim_k,
        rl_accelerated,
        rln_beats_rld,
        per_volume,
        first_volume,
    })
}

impl CompareReport {
    /// The strongest RL of the comparison by mean PSNR: (accelerated, iteration count).
    pub fn strongest_rl(&self) -> (bool, usize) {
        let plain = self.rows.iter().find(|r| r.method.starts_with("RLD,")).map(|r| r.psnr);
        let acc = self
            .rows
            .iter()
            .find(|r| r.method.starts_with("RL accelerated,"))
            .map(|r| r.psnr);
        match (self.rl_accelerated, plain, acc) {
            (Some(b), Some(p), Some(a)) if a > p => (true, b.best_psnr_iterations),
            _ => (false, self.rld_best_psnr_iterations),
        }
    }
}

/// Writes `path` (PNG): the central XY slices of the first held-out volume of `report`,
/// labelled input, the strongest RL at its best-PSNR count (run here: the comparison
/// keeps only its metrics), RLN and ground truth, each panel scaled to its own range.
pub fn write_first_volume_montage(report: &CompareReport, psf: &Volume, path: &std::path::Path) -> Result<()> {
    let v = report
        .first_volume
        .as_ref()
        .ok_or_else(|| Error::invalid("the comparison kept no volume to draw (it scored none)"))?;
    let (accelerate, iterations) = report.strongest_rl();
    let plan = RlPlan::new(report.size, psf, BackProjector::Matched)?;
    let opts = RunOptions {
        accelerate,
        ..RunOptions::default()
    };
    let (rld, _) = plan.run_with_options(&v.input, iterations, 0.0, &opts, None)?;
    let label = match accelerate {
        false => format!("RLD {iterations} it."),
        true => format!("RL acc. {iterations} it."),
    };
    crate::imaging::montage::write_montage(
        path,
        &[
            ("input", &v.input),
            (&label, &rld),
            ("RLN", &v.rln),
            ("ground truth", &v.ground_truth),
        ],
    )
}

/// Parses a comma-separated list of phantom families.
pub fn families(list: &[Family]) -> Vec<Family> {
    if list.is_empty() {
        Family::ALL.to_vec()
    } else {
        list.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging::psf::GaussianPsf;
    use crate::imaging::synth::make_pair;

    /// The sweep scores, at count k, exactly the estimate a k-iteration run returns (plain
    /// and accelerated), and the two variants differ: the curve is the one RL it names.
    #[test]
    fn the_curve_at_k_scores_a_k_iteration_run() {
        let psf = generate(&PsfSpec::Gaussian(GaussianPsf::from_fwhm(
            [3.0, 1.5, 1.5],
            [1.0; 3],
            Some([9, 9, 9]),
        )))
        .unwrap();
        let cfg = SynthConfig {
            size: [16, 24, 24],
            ..SynthConfig::default()
        };
        let (input, gt) = make_pair(&cfg, &psf, 7).unwrap();
        let plan = RlPlan::new(cfg.size, &psf, BackProjector::Matched).unwrap();
        let (lo, hi) = (2, 7);
        let mut curves = Vec::new();
        for accelerate in [false, true] {
            let curve = rl_metric_curve(&plan, &input, &gt, lo, hi, accelerate).unwrap();
            assert_eq!(curve.len(), hi + 1 - lo);
            for k in [lo, 5, hi] {
                let opts = RunOptions {
                    accelerate,
                    ..RunOptions::default()
                };
                let (est, _) = plan.run_with_options(&input, k, 0.0, &opts, None).unwrap();
                let m = evaluate(&gt, &est, Normalize::Affine, None).unwrap();
                assert_eq!(
                    (curve[k - lo].psnr, curve[k - lo].ssim),
                    (m.psnr, m.ssim),
                    "{accelerate} k={k}"
                );
            }
            curves.push(curve);
        }
        // Biggs–Andrews starts extrapolating at the third iteration: later counts differ
        let (plain, acc) = (&curves[0][hi - lo], &curves[1][hi - lo]);
        assert!((plain.psnr - acc.psnr).abs() > 1e-3, "{} vs {}", plain.psnr, acc.psnr);
    }
}
