//! `rln-engine infer`.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rln_engine::imaging::io::{read_volume, write_volume, OutputDtype};
use rln_engine::infer::stitch::{estimate_normalization, run_tiled_shrinking, Affine, NormalizeMode, StitchOptions};
use rln_engine::infer::tiling::{choose_core, MemorySource, PlaneSource, TilePlan, RECEPTIVE_RADIUS};
use rln_engine::infer::{CpuPredictor, TilePredictor};
use rln_engine::model::Model;
use std::path::PathBuf;
use std::time::Instant;

use super::train::parse_dims;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Device {
    /// CUDA when a GPU is usable, else the CPU (with a notice).
    Auto,
    Cpu,
    Cuda,
}

/// Parses "8G", "512M", "1.5GiB" or a number of bytes.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1usize << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 8G, 512M)"))?;
    if !(v > 0.0) {
        return Err(format!("{s:?}: the size must be positive"));
    }
    Ok((v * mult as f64) as usize)
}

/// MemAvailable of /proc/meminfo, if readable.
pub fn available_ram() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[derive(Args, Debug)]
pub struct InferArgs {
    /// Model file (or a training checkpoint).
    pub model: PathBuf,
    /// Input volume (TIFF stack, folder of 2-D slices, or file.h5:/dataset).
    pub input: PathBuf,
    /// Second view for RLN-dual models (registered to the first).
    #[arg(long)]
    pub input2: Option<PathBuf>,
    /// Output volume (.tif/.tiff, or .h5 with the hdf5 feature).
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// FP16 storage on the GPU (FP32 accumulation).
    #[arg(long)]
    pub fp16: bool,
    /// Memory for tiles (e.g. 4G); default: half of the available RAM (or GPU memory).
    #[arg(long, value_parser = parse_bytes)]
    pub memory: Option<usize>,
    /// Largest tile core (z,y,x), overriding --memory.
    #[arg(long, value_parser = parse_dims)]
    pub tile: Option<[usize; 3]>,
    /// Overlap of neighbouring tiles' cores, blended by linear ramps (z,y,x).
    #[arg(long, value_parser = parse_dims, default_value = "10,24,24")]
    pub overlap: [usize; 3],
    /// Extra input around each tile so tiles do not see their own edges (voxels);
    /// 0 is the authors' tiling.
    #[arg(long, default_value_t = RECEPTIVE_RADIUS)]
    pub context: usize,
    /// Input normalization: global percentiles (no tile-to-tile steps) or the authors' per-tile.
    #[arg(long, value_enum, default_value_t = NormalizeMode::Global)]
    pub normalize: NormalizeMode,
    /// Input normalization percentiles LOW,HIGH instead of the ones the model was trained
    /// with (recorded in it). A higher HIGH lowers the input's contrast; for very sparse
    /// specimens whose 99.5th percentile falls in the background this can help (see
    /// models/README.md), at a cost on dense ones.
    #[arg(long, value_parser = super::train::parse_range)]
    pub percentiles: Option<(f64, f64)>,
    /// Keep the network's normalized output instead of mapping it to the input's range.
    #[arg(long)]
    pub no_rescale: bool,
    /// Sample type of the output (f32, f16 or u16).
    #[arg(long, default_value = "f32")]
    pub output_dtype: OutputDtype,
}

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

pub fn infer(a: &InferArgs) -> Result<()> {
    rln_engine::fsutil::check_output_dir(&a.output)?;
    let mut model = Model::<f32>::load(&a.model).with_context(|| format!("loading model {}", a.model.display()))?;
    override_percentiles(&mut model, a.percentiles)?;
    let variant = model.config.variant;
    if variant.views() == 2 && a.input2.is_none() {
        bail!(
            "{} is an RLN-dual model ({variant:?}): give the second view with --input2",
            a.model.display()
        );
    }
    if variant.views() == 1 && a.input2.is_some() {
        bail!("{} is a single-view model: --input2 does not apply", a.model.display());
    }
    let t0 = Instant::now();
    let vol = read_volume(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let vol2 = match &a.input2 {
        Some(p) => Some(read_volume(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    if let Some(v2) = &vol2 {
        if v2.dims != vol.dims {
            bail!(
                "the two views differ in size: {} vs {}; register and resample them to one grid first",
                vol.shape_str(),
                v2.shape_str()
            );
        }
    }
    let t_read = t0.elapsed().as_secs_f64();
    let mut pred = make_predictor(a.device, a.fp16, &model)?;
    let core = match a.tile {
        Some(t) => t,
        None => {
            let budget = a
                .memory
                .or(pred.memory_budget())
                .unwrap_or_else(|| available_ram().unwrap_or(8 << 30) / 2);
            let max_window = (budget / pred.bytes_per_voxel()).max(16 * 16 * 16);
            choose_core(vol.dims, a.context, max_window)
        }
    };
    let pct = model.config.norm_percentiles;
    let mut src1 = MemorySource {
        dims: vol.dims,
        data: &vol.data,
    };
    let mut src2 = vol2.as_ref().map(|v| MemorySource {
        dims: v.dims,
        data: &v.data,
    });
    let mut global: Vec<Affine> = Vec::new();
    let t_norm = Instant::now();
    if a.normalize == NormalizeMode::Global {
        global.push(estimate_normalization(&mut src1, pct, 64 << 20)?);
        if let Some(s2) = src2.as_mut() {
            global.push(estimate_normalization(s2, pct, 64 << 20)?);
        }
    }
    let t_norm = t_norm.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let opts = StitchOptions {
        plan: TilePlan::new(vol.dims, core, a.overlap, a.context)?,
        normalize: a.normalize,
        percentiles: pct,
        rescale_output: !a.no_rescale,
        variant,
    };
    let bar = rln_engine::imaging::progress::bar(1, "tiles");
    let describe = pred.describe();
    let mut views: Vec<&mut dyn PlaneSource> = vec![&mut src1];
    if let Some(s2) = src2.as_mut() {
        views.push(s2);
    }
    let mut announce = |plan: &TilePlan, core: [usize; 3]| {
        eprintln!(
            "{} on {describe}: {} tile(s) of at most {:?} voxels (core {core:?}, overlap {:?}, context {}), {:?} normalization",
            a.input.display(),
            plan.count(),
            plan.max_window(),
            a.overlap,
            a.context,
            a.normalize
        );
        bar.set_length(plan.count() as u64);
        bar.set_position(0);
    };
    let (data, t, _) = run_tiled_shrinking(
        pred.as_mut(),
        &mut views,
        &global,
        &opts,
        core,
        a.overlap,
        a.context,
        &mut announce,
        &mut |d, _| bar.set_position(d as u64),
    )?;
    bar.finish_and_clear();
    if let Some(c) = t.constant_input {
        eprintln!(
            "warning: every voxel of {} is {c}: nothing to deconvolve (normalization is degenerate); \
             the output is the input unchanged",
            a.input.display()
        );
    }
    eprintln!(
        "tiled loop: read {:.2} s, cut+normalize {:.2} s, predictor {:.2} s, blend {:.2} s, emit {:.2} s",
        t.read, t.cut, t.predict, t.blend, t.emit
    );
    let t_net = t1.elapsed().as_secs_f64();
    let out = vol.like(data)?;
    let t2 = Instant::now();
    write_volume(&a.output, &out, a.output_dtype).with_context(|| format!("writing {}", a.output.display()))?;
    println!(
        "wrote {} ({}, {:?}): read {:.1} s, normalization {:.1} s, network {:.1} s ({:.3e} voxels/s), write {:.1} s",
        a.output.display(),
        out.shape_str(),
        a.output_dtype,
        t_read,
        t_norm,
        t_net,
        vol.len() as f64 / t_net,
        t2.elapsed().as_secs_f64()
    );
    Ok(())
}
