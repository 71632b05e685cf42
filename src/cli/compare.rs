//! `rln-engine compare`: RLN vs Richardson–Lucy at its best iteration count on held-out
//! synthetic volumes for the model's PSF.

use super::args::parse_dims;
use super::args::{make_predictor, Device};
use anyhow::{Context, Result};
use clap::Args;
use rln_engine::compare::{compare_on_synthetic, model_psf, RlSweep};
use rln_engine::imaging::io::{read_volume_with, ReadOptions};
use rln_engine::imaging::synth::{Family, SynthConfig};
use rln_engine::model::Model;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Model file; its metadata names the PSF it was trained for.
    #[arg(long)]
    pub model: PathBuf,
    /// PSF to make the volumes and run RLD with (default: regenerated from the model).
    #[arg(long)]
    pub psf: Option<PathBuf>,
    /// Number of held-out volumes.
    #[arg(long, default_value_t = 8)]
    pub count: usize,
    /// Seed of the held-out volumes (use one never used in training).
    #[arg(long, default_value_t = 1_000_003)]
    pub seed: u64,
    /// Size of each volume (z,y,x).
    #[arg(long, value_parser = parse_dims, default_value = "64,128,128")]
    pub size: [usize; 3],
    /// Phantom families in the volumes (default: all).
    #[arg(long, value_delimiter = ',')]
    pub families: Vec<Family>,
    /// Object density (1: the authors').
    #[arg(long, value_parser = super::finite_f64, default_value_t = 1.0)]
    pub density: f64,
    /// Photons per unit of ground truth (as in training).
    #[arg(long, value_parser = super::finite_f64, default_value_t = 5.0)]
    pub photons: f64,
    /// Gaussian read noise σ in photons (as in training; `train --like` prints the raw's).
    #[arg(long, value_parser = super::finite_f64, default_value_t = 0.5)]
    pub read_noise: f64,
    /// The scene's constant background in ground-truth units (as in training; `train --like`
    /// prints the raw's).
    #[arg(long, value_parser = super::finite_f64, default_value_t = 30.0)]
    pub background: f64,
    /// RLD iteration counts tried: from --rl-min to --rl-max.
    #[arg(long, default_value_t = 5)]
    pub rl_min: usize,
    #[arg(long, default_value_t = 100)]
    pub rl_max: usize,
    /// Also sweep Biggs–Andrews accelerated RL (cudaDecon's, `rl --accelerate`) over the
    /// same counts; RLN must then beat the stronger of plain and accelerated RL.
    #[arg(long)]
    pub rl_accelerated: bool,
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// RLN's input normalization percentiles LOW,HIGH instead of the model's own; this
    /// also replaces a model's fixed normalization (`train --fixed-norm`).
    #[arg(long, value_parser = super::args::parse_range)]
    pub percentiles: Option<(f64, f64)>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Channel of a multi-channel --psf file, from 0.
    #[arg(long)]
    pub channel: Option<usize>,
    /// Time point of a --psf file with several, from 0.
    #[arg(long)]
    pub time: Option<usize>,
    /// Also write a PNG of the first volume's central XY slice, labelled: input, the
    /// strongest RL at its best-PSNR iteration count, RLN, ground truth.
    #[arg(long)]
    pub png: Option<PathBuf>,
}

pub fn compare(a: &CompareArgs) -> Result<()> {
    let png = a.png.as_deref().map(|path| super::args::Output {
        role: "the montage --png",
        path,
        extensions: &["png"],
    });
    let mut inputs = vec![("the model --model", a.model.as_path())];
    if let Some(p) = &a.psf {
        inputs.push(("the PSF --psf", p.as_path()));
    }
    let _guard = super::args::guard_outputs(png.as_slice(), &inputs)?;
    let mut model = Model::<f32>::load(&a.model).context("--model")?;
    super::args::override_percentiles(&mut model, a.percentiles)?;
    let psf = match &a.psf {
        Some(p) => read_volume_with(
            p,
            &ReadOptions {
                channel: a.channel,
                time: a.time,
                ..Default::default()
            },
        )
        .context("--psf")?,
        None => model_psf(&model)?.1,
    };
    let synth = SynthConfig {
        size: a.size,
        photons: a.photons,
        read_noise: a.read_noise,
        background: a.background as f32,
        density: a.density,
        families: rln_engine::compare::families(&a.families),
        ..SynthConfig::default()
    };
    let mut pred = make_predictor(a.device, false, &model)?;
    let bar = rln_engine::imaging::progress::bar(a.count as u64, "volumes");
    let r = compare_on_synthetic(
        pred.as_mut(),
        &model,
        &psf,
        &synth,
        a.count,
        a.seed,
        RlSweep {
            min: a.rl_min,
            max: a.rl_max,
            accelerated: a.rl_accelerated,
        },
        &mut |i| bar.set_position(i as u64),
    )?;
    bar.finish_and_clear();
    if let Some(path) = &a.png {
        rln_engine::compare::write_first_volume_montage(&r, &psf, path)?;
        eprintln!("wrote {}", path.display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} held-out volumes of {:?} ({}), affine-normalized metrics against the ground truth:",
        r.volumes,
        r.size,
        r.families.join(", ")
    );
    println!("| method | mean PSNR (dB) | mean SSIM |");
    println!("|---|---|---|");
    for row in &r.rows {
        println!("| {} | {:.2} | {:.4} |", row.method, row.psnr, row.ssim);
    }
    println!(
        "RLN beats {} at its best iteration count on both: {}",
        if r.rl_accelerated.is_some() {
            "plain and accelerated RL"
        } else {
            "RLD"
        },
        if r.rln_beats_rld { "yes" } else { "no" }
    );
    Ok(())
}
