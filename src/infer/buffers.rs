//! Deconvolution of caller-owned buffers, for programs that link the engine (the C ABI
//! in `capi/`, the Python extension in `python/`): choosing the device by name, one
//! global normalization that the caller may compute once for many blocks (dask), and the
//! tiled network over a borrowed z,y,x slice, with the same tiling and normalization as
//! [`super::deconvolve`] and `rln-engine infer`.

use super::stitch::{model_normalization, run_tiled, Affine, NormalizeMode, StitchOptions};
use super::tiling::{choose_core, MemorySink, MemorySource, PlaneSource, TilePlan, DEFAULT_OVERLAP, RECEPTIVE_RADIUS};
use super::{CpuPredictor, TilePredictor};
use crate::backend::cuda::{self, CudaOptions, CudaPredictor, Precision};
use crate::error::{Error, Result};
use crate::model::Model;

/// Where the network runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// CUDA device 0 when one is usable, else the CPU (with a note saying why).
    Auto,
    Cpu,
    /// This CUDA device ordinal; an error when it cannot be used.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = Error;
    /// "auto", "cpu", "cuda" (device 0) or "cuda:N".
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => match t.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(Error::invalid(format!(
                    "unknown device {s:?}: give \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""
                ))),
            },
        }
    }
}

/// The predictor for `device` (FP16 storage on the GPU with `fp16`), and a note for the
/// user when `Auto` fell back to the CPU.
pub fn open_predictor(
    model: &Model<f32>,
    device: Device,
    fp16: bool,
) -> Result<(Box<dyn TilePredictor + Send>, Option<String>)> {
    let precision = if fp16 { Precision::F16 } else { Precision::F32 };
    open_predictor_with(model, device, precision)
}

/// [`open_predictor`] with any storage precision on the GPU (f32, f16, bf16).
pub fn open_predictor_with(
    model: &Model<f32>,
    device: Device,
    precision: Precision,
) -> Result<(Box<dyn TilePredictor + Send>, Option<String>)> {
    let opts = |ordinal: usize| CudaOptions {
        device: ordinal,
        ..CudaOptions::of(precision)
    };
    let cpu = || -> Box<dyn TilePredictor + Send> { Box::new(CpuPredictor { model: model.clone() }) };
    match device {
        Device::Cpu => Ok((cpu(), None)),
        Device::Cuda(n) => {
            if !cuda::available() {
                return Err(Error::Cuda(format!(
                    "device cuda:{n} was asked for but no CUDA device is usable here (no driver or no GPU); use device \"cpu\" or \"auto\""
                )));
            }
            Ok((Box::new(CudaPredictor::new(model, opts(n))?), None))
        }
        Device::Auto => {
            let why = if !cuda::available() {
                "no CUDA device".to_string()
            } else {
                match CudaPredictor::new(model, opts(0)) {
                    Ok(p) => return Ok((Box::new(p), None)),
                    Err(e) => format!("the CUDA device is not usable ({e})"),
                }
            };
            Ok((cpu(), Some(format!("{why}; running on the CPU"))))
        }
    }
}

/// Checks that `data` is a 3D volume of `dims` the network can take.
fn check_volume(dims: [usize; 3], len: usize) -> Result<()> {
    if dims.contains(&0) {
        return Err(Error::invalid(format!(
            "the volume is empty ({}×{}×{}); give a non-empty z,y,x stack",
            dims[0], dims[1], dims[2]
        )));
    }
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n != Some(len) {
        return Err(Error::Shape(format!(
            "a {}×{}×{} volume needs {} values, the buffer holds {len}",
            dims[0],
            dims[1],
            dims[2],
            n.map_or("too many".into(), |n| n.to_string())
        )));
    }
    Ok(())
}

/// The global input normalization `model` applies to a volume (its percentiles over
/// every voxel, or the model's fixed values), as [`super::deconvolve`] computes it. Compute it once on the whole
/// volume (or a strided sample of it) and pass it to [`deconvolve_slice`] for each
/// block, so that blocks of one volume are normalized alike.
pub fn global_normalization(model: &Model<f32>, dims: [usize; 3], data: &[f32]) -> Result<Affine> {
    check_volume(dims, data.len())?;
    let mut src = MemorySource { dims, data };
    model_normalization(&mut src, &model.config, usize::MAX)
}

/// The normalization of the given low and high percentile values (for instance read from
/// a file, or computed from a sample by [`global_normalization`]).
pub fn normalization_from_values(p_lo_value: f64, p_hi_value: f64) -> Result<Affine> {
    if !(p_lo_value.is_finite() && p_hi_value.is_finite()) {
        return Err(Error::invalid(format!(
            "normalization percentile values must be finite, got ({p_lo_value}, {p_hi_value})"
        )));
    }
    Ok(Affine::from_percentile_values(p_lo_value, p_hi_value))
}

/// The largest tile core for `dims` that fits the predictor's memory (its device memory,
/// or 4 GiB of host memory for the CPU).
pub fn default_core(pred: &dyn TilePredictor, dims: [usize; 3]) -> [usize; 3] {
    let budget = pred.memory_budget().unwrap_or(4 << 30);
    choose_core(
        dims,
        RECEPTIVE_RADIUS,
        (budget / pred.bytes_per_voxel().max(1)).max(16 * 16 * 16),
    )
}

/// Deconvolves the z-major volume `data` of `dims` with a single-view model: tiles of at
/// most `max_core` (default [`default_core`]) with the default overlap and context, the
/// given global `normalization` (default: [`global_normalization`] of `data`), output in
/// the input's intensity range. Equals [`super::deconvolve`] on the same volume. A
/// non-finite input or output is an error.
pub fn deconvolve_slice(
    pred: &mut dyn TilePredictor,
    model: &Model<f32>,
    dims: [usize; 3],
    data: &[f32],
    max_core: Option<[usize; 3]>,
    normalization: Option<Affine>,
) -> Result<Vec<f32>> {
    check_volume(dims, data.len())?;
    if model.config.variant.views() != 1 {
        return Err(Error::invalid(format!(
            "this is an RLN-dual model ({:?}); the buffer interface takes single-view models (use `rln-engine infer --input2` for two views)",
            model.config.variant
        )));
    }
    let core = match max_core {
        Some(c) if c.contains(&0) => return Err(Error::invalid(format!("tile sizes must be positive, got {c:?}"))),
        Some(c) => c,
        None => default_core(pred, dims),
    };
    let aff = match normalization {
        Some(a) => a,
        None => global_normalization(model, dims, data)?,
    };
    let opts = StitchOptions {
        plan: TilePlan::new(dims, core, DEFAULT_OVERLAP, RECEPTIVE_RADIUS)?,
        normalize: NormalizeMode::Global,
        percentiles: model.config.norm_percentiles,
        rescale_output: true,
        variant: model.config.variant,
    };
    let mut src = MemorySource { dims, data };
    if normalization.is_some() {
        // estimate_normalization checks the input for NaN/inf; a given normalization skips it
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(format!(
                "the input holds a non-finite value ({}) at voxel {i}: clean the volume (e.g. replace NaN with 0) before inference",
                data[i]
            )));
        }
    }
    let mut sink = MemorySink {
        data: Vec::with_capacity(data.len()),
    };
    let mut views: Vec<&mut dyn PlaneSource> = vec![&mut src];
    run_tiled(pred, &mut views, &[aff], &mut sink, &opts, &mut |_, _| {})?;
    if let Some(i) = sink.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::Numeric(format!(
            "the network produced a non-finite value ({}) at voxel {i}; check the model file and the input's range",
            sink.data[i]
        )));
    }
    Ok(sink.data)
}
