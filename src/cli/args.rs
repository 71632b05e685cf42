//! Argument parsing and checks shared by every subcommand, in one place: the value
//! parsers (`parse_dims`, `parse_range`, `finite_f64`...) and the checks run before any
//! work. They live in the library ([`rln_engine::args`]) so the bindings' commands
//! (Python's `rln_engine.train`) parse and check the same.

pub use rln_engine::args::*;

use anyhow::{Context, Result};
use rln_engine::infer::TilePredictor;
use rln_engine::model::Model;

/// The predictor for `--device`: CUDA when asked for and usable, else the CPU (the
/// choice is the library's [`open_predictor`]; its note is printed here).
pub fn make_predictor(device: Device, fp16: bool, model: &Model<f32>) -> Result<Box<dyn TilePredictor>> {
    use rln_engine::infer::buffers::{self, open_predictor};
    if device == Device::Cpu && fp16 {
        eprintln!("note: --fp16 applies to the GPU; the CPU computes in f32");
    }
    let device = match device {
        Device::Auto => buffers::Device::Auto,
        Device::Cpu => buffers::Device::Cpu,
        Device::Cuda => buffers::Device::Cuda(0),
    };
    let (predictor, note) = open_predictor(model, device, fp16).context("--device")?;
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    Ok(predictor)
}

/// Replaces the model's recorded normalization percentiles by `--percentiles`, if given
/// (an invalid pair is an error, and the caller drops the model).
pub fn override_percentiles(model: &mut Model<f32>, percentiles: Option<(f64, f64)>) -> Result<()> {
    if let Some((lo, hi)) = percentiles {
        model.config.norm_percentiles = [lo, hi];
        model.config.norm_fixed = None;
        model.config.validate().context("--percentiles")?;
    }
    Ok(())
}
