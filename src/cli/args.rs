//! Argument parsing and checks shared by every subcommand, in one place: the value
//! parsers (`parse_dims`, `parse_range`, `finite_f64`...) and the checks run before any
//! work. They live in the library ([`rln_engine::args`]) so the bindings' commands
//! (Python's `rln_engine.train`) parse and check the same.

pub use rln_engine::args::*;

use anyhow::{Context, Result};
use rln_engine::infer::{CpuPredictor, TilePredictor};
use rln_engine::model::Model;

/// The predictor for `--device`: CUDA when asked for and usable, else the CPU.
pub fn make_predictor(device: Device, fp16: bool, model: &Model<f32>) -> Result<Box<dyn TilePredictor>> {
    use rln_engine::backend::cuda::{self, CudaOptions, CudaPredictor};
    let opts = if fp16 { CudaOptions::f16() } else { CudaOptions::f32() };
    match device {
        Device::Cpu => {
            if fp16 {
                eprintln!("note: --fp16 applies to the GPU; the CPU computes in f32");
            }
            Ok(Box::new(CpuPredictor { model: model.clone() }))
        }
        Device::Cuda => Ok(Box::new(CudaPredictor::new(model, opts).context("--device cuda")?)),
        Device::Auto => {
            if cuda::available() {
                match CudaPredictor::new(model, opts) {
                    Ok(p) => return Ok(Box::new(p)),
                    Err(e) => {
                        eprintln!("note: the CUDA device is not usable ({e}); running on the CPU")
                    }
                }
            } else {
                eprintln!("note: no CUDA device; running on the CPU");
            }
            Ok(Box::new(CpuPredictor { model: model.clone() }))
        }
    }
}

/// Replaces the model's recorded normalization percentiles by `--percentiles`, if given
/// (an invalid pair is an error, and the caller drops the model).
pub fn override_percentiles(model: &mut Model<f32>, percentiles: Option<(f64, f64)>) -> Result<()> {
    if let Some((lo, hi)) = percentiles {
        model.config.norm_percentiles = [lo, hi];
        model.config.validate().context("--percentiles")?;
    }
    Ok(())
}
