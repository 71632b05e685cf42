//! RLN against classical Richardson–Lucy on held-out synthetic volumes, and the demo.
//!
//! Both methods see the same raw input; both are scored against the ground truth with
//! `eval`'s affine normalization (ground truth percentile-normalized, prediction fitted
//! by least-squares scale and offset). RLD is scored at every iteration count from
//! `rl_min` to `rl_max` and reported at its best count (best mean PSNR, best mean SSIM),
//! which favours RLD: in practice nobody knows the best count.

use crate::error::{Error, Result};
use crate::imaging::metrics::{evaluate, Metrics, Normalize};
use crate::imaging::psf::{generate, PsfSpec};
use crate::imaging::rl::{BackProjector, RlPlan};
use crate::imaging::synth::{mix_seed, Family, SynthConfig, Synthesizer};
use crate::imaging::volume::Volume;
use crate::infer::deconvolve;
use crate::infer::TilePredictor;
use crate::model::Model;
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

/// RLD metrics at every iteration count in `lo..=hi` (index i ↔ count lo + i).
pub fn rl_metric_curve(plan: &RlPlan, input: &Volume, gt: &Volume, lo: usize, hi: usize) -> Result<Vec<Metrics>> {
    let mut curve = Vec::with_capacity(hi + 1 - lo);
    let mut err = None;
    plan.run(input, hi, 0.0, |it, est| {
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
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    Ok(curve)
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
    /// The percentiles RLN's input was normalized with.
    pub rln_percentiles: [f64; 2],
    pub seeds: Vec<u64>,
    pub rows: Vec<MethodScore>,
    /// RLD iteration counts with the best mean PSNR and the best mean SSIM.
    pub rld_best_psnr_iterations: usize,
    pub rld_best_ssim_iterations: usize,
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
    rl_range: (usize, usize),
    progress: &mut dyn FnMut(usize),
) -> Result<CompareReport> {
    let (lo, hi) = rl_range;
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
    let s = Synthesizer::new(synth, psf)?;
    let plan = RlPlan::new(synth.size, psf, BackProjector::Matched)?;
    let mut rln = Vec::new();
    let mut raw = Vec::new();
    let mut curves = Vec::new();
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
        let curve = rl_metric_curve(&plan, &input, &gt, lo, hi)?;
        per_volume.push(
            serde_json::json!({"seed": sd, "input": [m_raw.psnr, m_raw.ssim], "rln": [m_rln.psnr, m_rln.ssim],
            "rld_best_psnr": curve.iter().map(|m| m.psnr).fold(f64::MIN, f64::max),
            "rld_best_ssim": curve.iter().map(|m| m.ssim).fold(f64::MIN, f64::max)}),
        );
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
    let mean_at = |k: usize, f: fn(&Metrics) -> f64| curves.iter().map(|c| f(&c[k])).sum::<f64>() / n;
    let best_psnr_k = (0..iters)
        .max_by(|&a, &b| mean_at(a, |m| m.psnr).total_cmp(&mean_at(b, |m| m.psnr)))
        .unwrap();
    let best_ssim_k = (0..iters)
        .max_by(|&a, &b| mean_at(a, |m| m.ssim).total_cmp(&mean_at(b, |m| m.ssim)))
        .unwrap();
    let rows = vec![
        MethodScore {
            method: "raw input".into(),
            psnr: mean(&raw, |m| m.psnr),
            ssim: mean(&raw, |m| m.ssim),
        },
        MethodScore {
            method: format!("RLD, {} iterations (best mean PSNR)", lo + best_psnr_k),
            psnr: mean_at(best_psnr_k, |m| m.psnr),
            ssim: mean_at(best_psnr_k, |m| m.ssim),
        },
        MethodScore {
            method: format!("RLD, {} iterations (best mean SSIM)", lo + best_ssim_k),
            psnr: mean_at(best_ssim_k, |m| m.psnr),
            ssim: mean_at(best_ssim_k, |m| m.ssim),
        },
        MethodScore {
            method: "RLN".into(),
            psnr: mean(&rln, |m| m.psnr),
            ssim: mean(&rln, |m| m.ssim),
        },
    ];
    let rln_beats_rld = rows[3].psnr > rows[1].psnr && rows[3].ssim > rows[2].ssim;
    Ok(CompareReport {
        volumes: count,
        size: synth.size,
        families: synth.families.iter().map(|f| f.name().to_string()).collect(),
        density: synth.density,
        photons: synth.photons,
        rln_percentiles: model.config.norm_percentiles,
        seeds,
        rows,
        rld_best_psnr_iterations: lo + best_psnr_k,
        rld_best_ssim_iterations: lo + best_ssim_k,
        rln_beats_rld,
        per_volume,
        first_volume,
    })
}

/// Writes `path` (PNG): the central XY slices of the first held-out volume of `report`,
/// labelled input, RLD at `rl_iterations` (run here: the comparison keeps only its
/// metrics), RLN and ground truth, each panel scaled to its own range.
pub fn write_first_volume_montage(
    report: &CompareReport,
    psf: &Volume,
    rl_iterations: usize,
    path: &std::path::Path,
) -> Result<()> {
    let v = report
        .first_volume
        .as_ref()
        .ok_or_else(|| Error::invalid("the comparison kept no volume to draw (it scored none)"))?;
    let plan = RlPlan::new(report.size, psf, BackProjector::Matched)?;
    let rld = plan.run_silent(&v.input, rl_iterations, 0.0)?;
    let label = format!("RLD {rl_iterations} it.");
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
