//! `rln-engine infer`: its flags, their checks, and one call of the library's streaming
//! inference ([`rln_engine::infer::stream::infer_file`]) or store planning.

use anyhow::{bail, Result};
use clap::Args;
use rln_engine::backend::cuda::Precision;
use rln_engine::imaging::io::{OutputDtype, ReadOptions};
use rln_engine::imaging::stream::Region;
use rln_engine::infer::stitch::NormalizeMode;
use rln_engine::infer::stream::{infer_file, plan, InferFileOptions, PredictorChoice};
use rln_engine::infer::tiling::RECEPTIVE_RADIUS;
use std::path::PathBuf;

use super::args::{parse_bytes, parse_dims, Device};

#[derive(Args, Debug)]
#[command(after_long_help = INFER_NOTES)]
pub struct InferArgs {
    /// Model file (or a training checkpoint).
    pub model: PathBuf,
    /// Input volume (TIFF stack, folder of 2-D slices, file.h5:/dataset, or an OME-Zarr folder).
    pub input: PathBuf,
    /// Second view for RLN-dual models (registered to the first).
    #[arg(long)]
    pub input2: Option<PathBuf>,
    /// Output volume (.tif/.tiff, .h5 with the hdf5 feature, or an OME-Zarr folder *.zarr).
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// CUDA devices to use, e.g. 0,1 (implies --device cuda): one predictor worker per
    /// device, all pulling tiles from the same plan.
    #[arg(long, value_delimiter = ',')]
    pub devices: Option<Vec<usize>>,
    /// FP16 storage on the GPU (FP32 accumulation).
    #[arg(long, conflicts_with = "bf16")]
    pub fp16: bool,
    /// BF16 storage on the GPU (FP32 accumulation): fp16's speed with f32's range, for
    /// models whose activations overflow fp16 (8 significant bits instead of 11).
    #[arg(long)]
    pub bf16: bool,
    /// Host memory for the tiles in flight (e.g. 4G): sets the tile size, and with it
    /// the peak memory (see README, "Streaming inference"); default: 4 GiB or half the
    /// available RAM when less (on a GPU: its free memory).
    #[arg(long, value_parser = parse_bytes)]
    pub memory: Option<usize>,
    /// Largest tile core (z,y,x), overriding --memory.
    #[arg(long, value_parser = parse_dims)]
    pub tile: Option<[usize; 3]>,
    /// Overlap of neighbouring tiles' cores, blended by linear ramps (z,y,x); only used
    /// by the blended tiling (--context below 18 or --normalize per-tile).
    #[arg(long, value_parser = parse_dims, default_value = "10,24,24")]
    pub overlap: [usize; 3],
    /// Extra input around each tile so tiles do not see their own edges (voxels);
    /// 0 is the authors' tiling (blended overlapping tiles).
    #[arg(long, default_value_t = RECEPTIVE_RADIUS)]
    pub context: usize,
    /// Input normalization: global percentiles (no tile-to-tile steps; from a bounded
    /// sample of the volume, see below) or the authors' per-tile. A model trained with
    /// `train --fixed-norm` maps every volume by its fixed values instead (per-tile is
    /// then refused unless --percentiles replaces them).
    #[arg(long, value_enum, default_value_t = NormalizeMode::Global)]
    pub normalize: NormalizeMode,
    /// Input normalization percentiles LOW,HIGH instead of the ones the model was trained
    /// with (recorded in it); this also replaces a model's fixed normalization (`train
    /// --fixed-norm`). A higher HIGH lowers the input's contrast; for very sparse
    /// specimens whose 99.5th percentile falls in the background this can help (see
    /// models/README.md), at a cost on dense ones.
    #[arg(long, value_parser = super::args::parse_range)]
    pub percentiles: Option<(f64, f64)>,
    /// Global normalization statistics: read from FILE if it exists (refused if made for
    /// another input shape or other percentiles), else measured and written there, so
    /// that every worker of a split job maps intensities identically.
    #[arg(long, value_name = "FILE")]
    pub norm_stats: Option<PathBuf>,
    /// Keep the network's normalized output instead of mapping it to the input's range.
    #[arg(long)]
    pub no_rescale: bool,
    /// Sample type of the output (f32, f16 or u16).
    #[arg(long, default_value = "f32")]
    pub output_dtype: OutputDtype,
    /// Chunk shape (z,y,x) of a created OME-Zarr output; default 64,256,256. Tile cores
    /// are multiples of it.
    #[arg(long, value_parser = parse_dims)]
    pub chunks: Option<[usize; 3]>,
    /// Create the output store, its plan (OUT/.rln/plan.json) and the normalization
    /// statistics, then exit: the first step of a split job.
    #[arg(long)]
    pub create_only: bool,
    /// Compute block I of N (0 ≤ I < N) of the store's tile cores (z,y,x raster order,
    /// N contiguous ranges) into the existing store, then mark OUT/.rln/blocks/N/I.done.
    #[arg(long, value_parser = plan::parse_block, value_name = "I/N")]
    pub block: Option<(usize, usize)>,
    /// Compute only the tile cores that meet z0:z1,y0:y1,x0:x1 (half-open) into the
    /// existing store.
    #[arg(long, value_parser = plan::parse_region, value_name = "z0:z1,y0:y1,x0:x1")]
    pub region: Option<Region>,
    /// Continue a killed run into a store: skip blocks marked done and the tiles the
    /// run had written.
    #[arg(long)]
    pub resume: bool,
    /// Print a JSON summary (phases, peak memory, voxels/s) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Replace the network by a copy of its input (measures the host pipeline alone;
    /// the output is NOT a deconvolution).
    #[arg(long, hide = true)]
    pub copy_network: bool,
    /// Channel of a multi-channel input (RGB samples or ImageJ/OME channels), from 0.
    #[arg(long)]
    pub channel: Option<usize>,
    /// Time point of an input with several (ImageJ frames, OME SizeT), from 0.
    #[arg(long)]
    pub time: Option<usize>,
}

const INFER_NOTES: &str = "\
Streaming: infer reads only the windows of the tiles in flight and writes each finished
tile core at once, so memory is set by --memory, not by the volume (README: \"Streaming
inference\" gives the formula).

Global normalization uses percentiles of the whole volume when it holds at most 4.2 M
voxels, else of a stratified sample of 4.2 M voxels in blocks of the input's chunks.
On the test volumes (tests/stream_infer.rs) the sampled percentiles differed from the
exact ones by at most 1% of (P_high − P_low). A volume whose two percentiles are equal
(e.g. constant) is copied to the output unchanged. A model trained with --fixed-norm
samples nothing: every volume is mapped by its recorded values (--percentiles instead
normalizes by percentiles).

Split jobs: `infer M IN -o OUT.zarr --create-only --norm-stats S.json`, then one
`infer M IN -o OUT.zarr --block I/N` per worker (any order, any machine sharing the store),
then `rln-engine finalize OUT.zarr`.";

pub fn infer(a: &InferArgs) -> Result<()> {
    let mut inputs = vec![
        ("the model", a.model.as_path()),
        ("the input volume", a.input.as_path()),
    ];
    inputs.extend(a.input2.as_deref().map(|p| ("the second view --input2", p)));
    inputs.extend(
        a.norm_stats
            .as_deref()
            .filter(|p| p.exists())
            .map(|p| ("the --norm-stats file", p)),
    );
    // split jobs write one existing store from many processes at once (each block its own
    // chunks), so only whole runs take the output lock; none may overwrite an input
    let split = a.block.is_some() || a.region.is_some() || a.resume;
    let _guard = if split {
        rln_engine::fsutil::refuse_overwriting_inputs(&[("the output -o", a.output.as_path())], &inputs)?;
        None
    } else {
        let out = super::args::Output {
            role: "the output -o",
            path: &a.output,
            extensions: super::args::VOLUME_EXTENSIONS,
        };
        Some(super::args::guard_outputs(&[out], &inputs)?)
    };
    super::args::check_tile(a.tile)?;
    super::args::check_fp16_on_cpu(a.fp16, a.device == Device::Cpu)?;
    if a.bf16 && a.device == Device::Cpu {
        bail!("--bf16 applies to the GPU only (the CPU computes in f32): drop --bf16, or use --device cuda");
    }
    let precision = match (a.fp16, a.bf16) {
        (true, _) => Precision::F16,
        (_, true) => Precision::Bf16,
        _ => Precision::F32,
    };
    let predictor = if a.copy_network {
        PredictorChoice::Copy
    } else if let Some(d) = &a.devices {
        if a.device == Device::Cpu {
            bail!("--devices names CUDA devices; it does not go with --device cpu");
        }
        PredictorChoice::Cuda {
            devices: d.clone(),
            precision,
        }
    } else {
        match a.device {
            Device::Cpu => PredictorChoice::Cpu,
            Device::Cuda => PredictorChoice::Cuda {
                devices: vec![0],
                precision,
            },
            Device::Auto => PredictorChoice::Auto { precision },
        }
    };
    let mut o = InferFileOptions::new(a.model.clone(), a.input.clone(), a.output.clone());
    o.input2 = a.input2.clone();
    o.predictor = predictor;
    o.percentiles = a.percentiles.map(|(lo, hi)| [lo, hi]);
    o.normalize = a.normalize;
    o.rescale_output = !a.no_rescale;
    o.output_dtype = a.output_dtype;
    o.chunks = a.chunks;
    o.memory = a.memory;
    o.tile = a.tile;
    o.overlap = a.overlap;
    o.context = a.context;
    o.norm_stats = a.norm_stats.clone();
    o.create_only = a.create_only;
    o.block = a.block;
    o.region = a.region;
    o.resume = a.resume;
    o.read_options = ReadOptions {
        channel: a.channel,
        time: a.time,
        ..Default::default()
    };
    // no "infer a → b" context: errors about a file name it themselves, and
    // inspecting the message to avoid saying it twice would be sniffing text
    let s = infer_file(&o)?;
    if let Some(note) = &s.device_note {
        eprintln!("note: {note}");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    if a.create_only {
        println!(
            "created {} ({} tile cores of {:?}); run its blocks with --block I/N",
            a.output.display(),
            s.tiles_total,
            s.core
        );
        return Ok(());
    }
    let p = &s.phases;
    println!(
        "wrote {} ({}, {:?}): {} tile(s), {:.1} s, {:.3e} voxels/s (read {:.1} s, normalize {:.1} s, compute {:.1} s, blend {:.1} s, write {:.1} s; peak memory {:.2} GB)",
        a.output.display(),
        rln_engine::imaging::volume::dims_str(s.dims),
        a.output_dtype,
        s.tiles,
        s.seconds,
        s.voxels_per_s,
        p.read,
        p.normalize,
        p.compute,
        p.blend,
        p.write,
        s.peak_rss_bytes.unwrap_or(0) as f64 / 1e9
    );
    Ok(())
}
