//! `rln-engine demo`: parse, one call of [`rln_engine::demo`] (RLN and Richardson–Lucy on
//! a synthetic volume, side by side), print.

use super::args::{make_predictor, parse_dims, Device};
use anyhow::{Context, Result};
use clap::Args;
use rln_engine::demo::{run_demo, shipped_model, DemoOptions};
use rln_engine::model::Model;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder for the TIFFs and the PNG (created if missing).
    #[arg(long = "out", default_value = "rln-demo")]
    pub out: PathBuf,
    /// Model to demonstrate (default: the shipped models/rln-synthetic-widefield, built in).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Size of the synthetic volume (z,y,x).
    #[arg(long, value_parser = parse_dims, default_value = "64,256,256")]
    pub size: [usize; 3],
    /// Seed of the synthetic volume (the default was never used in training).
    #[arg(long, default_value_t = 20_221_027)]
    pub seed: u64,
    /// Richardson–Lucy runs up to this many iterations and is shown at its best.
    #[arg(long, default_value_t = 100)]
    pub rl_iterations: usize,
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
}

pub fn demo(a: &DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    let model = match &a.model {
        Some(p) => Model::<f32>::load(p).context("--model")?,
        None => shipped_model()?,
    };
    // FP16 on a GPU (the fast path); the CPU computes in f32 without a note about it
    let mut pred = make_predictor(a.device, a.device != Device::Cpu, &model)?;
    let opts = DemoOptions {
        out_dir: a.out.clone(),
        size: a.size,
        seed: a.seed,
        rl_max_iterations: a.rl_iterations,
    };
    let r = run_demo(pred.as_mut(), &model, &opts, &mut |m| eprintln!("{m}"))?;
    println!("\n{:<22} {:>10} {:>8} {:>10}", "", "PSNR (dB)", "SSIM", "time (s)");
    for row in &r.rows {
        let t = if row.seconds > 0.0 {
            format!("{:.1}", row.seconds)
        } else {
            "-".into()
        };
        println!("{:<22} {:>10.2} {:>8.4} {:>10}", row.name, row.psnr, row.ssim, t);
    }
    println!("(against the ground truth, affine normalization as in `rln-engine eval`; RLD shown at its best iteration count)");
    println!("\nwrote:");
    for f in &r.files {
        println!("  {}", f.display());
    }
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
