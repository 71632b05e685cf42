//! `rln-engine demo`: a synthetic volume for the shipped model's PSF, deconvolved by RLN
//! and by classical Richardson–Lucy, written as TIFFs and one PNG, with metrics.

use crate::compare::model_psf;
use crate::error::{Error, Result};
use crate::imaging::io::{write_volume, OutputDtype};
use crate::imaging::metrics::{evaluate, fit_affine, Metrics, Normalize};
pub use crate::imaging::montage::write_montage;
use crate::imaging::normalize::normalize_percentile;
use crate::imaging::rl::{BackProjector, RlPlan};
use crate::imaging::synth::{SynthConfig, Synthesizer};
use crate::imaging::volume::Volume;
use crate::infer::deconvolve;
use crate::infer::TilePredictor;
use crate::model::Model;
use serde::Serialize;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

/// The shipped model, embedded so that `demo` works from any folder.
pub const SHIPPED_MODEL: &[u8] = include_bytes!("../models/rln-synthetic-widefield.safetensors");

pub fn shipped_model() -> Result<Model<f32>> {
    Model::from_bytes("models/rln-synthetic-widefield.safetensors (embedded)", SHIPPED_MODEL)
}

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub out_dir: PathBuf,
    pub size: [usize; 3],
    pub seed: u64,
    /// RLD runs up to this many iterations and is shown at its best PSNR.
    pub rl_max_iterations: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct DemoRow {
    pub name: String,
    pub psnr: f64,
    pub ssim: f64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    pub rows: Vec<DemoRow>,
    pub rl_iterations: usize,
    pub files: Vec<PathBuf>,
    pub predictor: String,
}

fn psnr_only(gt_norm: &[f32], pred: &[f32]) -> f64 {
    let (a, b) = fit_affine(pred, gt_norm);
    let (lo, hi) = gt_norm
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
    let mse = gt_norm
        .iter()
        .zip(pred)
        .map(|(&g, &p)| (g as f64 - (a * p as f64 + b)).powi(2))
        .sum::<f64>()
        / gt_norm.len() as f64;
    10.0 * ((hi - lo) as f64 * (hi - lo) as f64 / mse).log10()
}

pub fn run_demo(
    pred: &mut dyn TilePredictor,
    model: &Model<f32>,
    opts: &DemoOptions,
    say: &mut dyn FnMut(&str),
) -> Result<DemoReport> {
    let (_, psf) = model_psf(model)?;
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io(&opts.out_dir, e))?;
    say(&format!(
        "making a {}×{}×{} synthetic volume for the model's PSF ...",
        opts.size[0], opts.size[1], opts.size[2]
    ));
    let synth = SynthConfig {
        size: opts.size,
        ..SynthConfig::default()
    };
    let (input, gt) = Synthesizer::new(&synth, &psf)?.make_pair(opts.seed)?;

    say(&format!("RLN ({}) ...", pred.describe()));
    let t = Instant::now();
    let rln = deconvolve(pred, model, &input, [256, 256, 256])?;
    let t_rln = t.elapsed().as_secs_f64();

    say(&format!(
        "Richardson–Lucy, up to {} iterations ...",
        opts.rl_max_iterations
    ));
    let gt_norm = normalize_percentile(&gt.data, 0.01, 99.5)?;
    let t = Instant::now();
    let plan = RlPlan::new(input.dims, &psf, BackProjector::Matched)?;
    let mut best: Option<(f64, usize, Volume)> = None;
    plan.run(&input, opts.rl_max_iterations, 0.0, |it, est| {
        let p = psnr_only(&gt_norm, &est.data);
        if best.as_ref().is_none_or(|b| p > b.0) {
            best = Some((p, it, est.clone()));
        }
        ControlFlow::Continue(())
    })?;
    let t_rl = t.elapsed().as_secs_f64();
    let (_, rl_iters, rld) = best.ok_or_else(|| Error::invalid("RL ran no iteration"))?;

    let score = |v: &Volume| -> Result<Metrics> { evaluate(&gt, v, Normalize::Affine, None) };
    let (m_in, m_rl, m_rln) = (score(&input)?, score(&rld)?, score(&rln)?);
    let rows = vec![
        DemoRow {
            name: "input".into(),
            psnr: m_in.psnr,
            ssim: m_in.ssim,
            seconds: 0.0,
        },
        DemoRow {
            name: format!("RLD ({rl_iters} it.)"),
            psnr: m_rl.psnr,
            ssim: m_rl.ssim,
            seconds: t_rl,
        },
        DemoRow {
            name: "RLN".into(),
            psnr: m_rln.psnr,
            ssim: m_rln.ssim,
            seconds: t_rln,
        },
    ];
    let mut files = Vec::new();
    for (name, v) in [
        ("input.tif", &input),
        ("rln.tif", &rln),
        ("rld.tif", &rld),
        ("ground_truth.tif", &gt),
    ] {
        let p = opts.out_dir.join(name);
        write_volume(&p, v, OutputDtype::F32)?;
        files.push(p);
    }
    let png = opts.out_dir.join("comparison.png");
    let rld_label = format!("RLD {rl_iters} it.");
    write_montage(
        &png,
        &[
            ("input", &input),
            (&rld_label, &rld),
            ("RLN", &rln),
            ("ground truth", &gt),
        ],
    )?;
    files.push(png);
    Ok(DemoReport {
        rows,
        rl_iterations: rl_iters,
        files,
        predictor: pred.describe(),
    })
}
