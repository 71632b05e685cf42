//! Streaming, bounded-memory inference from files to files (`rln-engine infer`), and
//! the pieces a cluster job needs: block mode, resume, norm-stats files, store plans.
//!
//! Two tilings:
//! - **cores** (the default: global normalization and `context` ≥ the receptive radius):
//!   non-overlapping, chunk-aligned tile cores ([`plan::CorePlan`]), each finished core
//!   written at once by the overlapped pipeline of [`pipeline`]. Equal to whole-volume
//!   inference up to float rounding. Block mode, `--region`, `--resume` and
//!   `--create-only` need it.
//! - **blended** (the authors' `--context 0` tiling, or `--normalize per-tile`): cores
//!   overlap by `--overlap` and are blended with linear ramps by [`super::stitch::run_tiled`],
//!   which streams by z-bands; memory then grows with a band (window depth × H × W)
//!   rather than a tile — documented in README, not used for block mode.
//!
//! Peak host memory of the cores tiling, for a tile window of W voxels (the core plus
//! `2·context` per axis), N predictor workers each needing B bytes per window voxel
//! (CPU: 320): `W·(N·B + 4·C·(P+N) + 4·(P+N−1))` plus the reader's cache (a chunk per
//! read thread; for TIFF a slab of pages of the window's depth) and, when a write unit
//! is larger than a core (a TIFF plane), one band of `core_z × H × W` f32; C input
//! channels, P = prefetch (3). `--memory` sets W through [`choose_window`], and W the
//! core through [`plan::budget_core`] — from the budget alone, so memory does not grow
//! with the volume ([`plan::CorePlan::memory_estimate`]).
//!
//! Stores (OME-Zarr) carry the run's plan in `OUT/.rln/plan.json` (tile cores, context,
//! normalization, model identity), a per-job watermark of written tiles in
//! `OUT/.rln/progress/`, and block markers `OUT/.rln/blocks/N/I.done`.

pub mod files;
pub mod norm;
pub mod pipeline;
pub mod plan;

use crate::backend::cuda::Precision;
use crate::error::{Error, Result};
use crate::imaging::io::OutputDtype;
use crate::imaging::stream::{Region, VolumeReader, VolumeWriter, WriterSpec};
use crate::infer::stitch::{run_tiled, Affine, NormalizeMode, StitchOptions};
use crate::infer::tiling::{PlaneSink, PlaneSource, TilePlan, RECEPTIVE_RADIUS};
use crate::infer::TilePredictor;
use crate::model::{FixedNorm, Model, Variant};
use crate::tensor::Tensor;
use norm::{NormStats, ViewStats, NORM_STATS_FORMAT};
use pipeline::{PhaseSeconds, PipelineHooks, PipelineOptions};
use plan::CorePlan;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// Which predictor runs the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PredictorChoice {
    Cpu,
    /// CUDA devices (one worker each, in both tilings) in f32, f16 or bf16 storage.
    Cuda {
        devices: Vec<usize>,
        precision: Precision,
    },
    /// CUDA when usable, else the CPU (with a notice).
    Auto {
        precision: Precision,
    },
    /// No network: the prediction is the normalized input (a benchmark of the host
    /// side's own ceiling; labelled as such in the summary).
    Copy,
}

/// Everything `infer` does, as options.
#[derive(Clone, Debug)]
pub struct InferFileOptions {
    pub model: PathBuf,
    pub input: PathBuf,
    pub input2: Option<PathBuf>,
    pub output: PathBuf,
    pub predictor: PredictorChoice,
    /// Normalization percentiles instead of the model's own.
    pub percentiles: Option<[f64; 2]>,
    pub normalize: NormalizeMode,
    pub rescale_output: bool,
    pub output_dtype: OutputDtype,
    /// Chunks of a created store (z, y, x); None: the format's default (clipped to the volume).
    pub chunks: Option<[usize; 3]>,
    /// Host memory for tiles in flight (bytes); None: [`default_memory`].
    pub memory: Option<usize>,
    /// Largest tile core, overriding `memory`.
    pub tile: Option<[usize; 3]>,
    /// Overlap of blended cores (blended tiling only).
    pub overlap: [usize; 3],
    pub context: usize,
    /// Read if it exists (checked against the input and percentiles), else written.
    pub norm_stats: Option<PathBuf>,
    pub create_only: bool,
    pub block: Option<(usize, usize)>,
    pub region: Option<Region>,
    pub resume: bool,
    pub pipeline: PipelineOptions,
    /// Voxels of the normalization sample.
    pub sample_voxels: usize,
    /// Channel / time point selection of the inputs (multi-channel or time-lapse files).
    pub read_options: crate::imaging::io::ReadOptions,
}

impl InferFileOptions {
    pub fn new(model: PathBuf, input: PathBuf, output: PathBuf) -> Self {
        InferFileOptions {
            model,
            input,
            input2: None,
            output,
            predictor: PredictorChoice::Cpu,
            percentiles: None,
            normalize: NormalizeMode::Global,
            rescale_output: true,
            output_dtype: OutputDtype::F32,
            chunks: None,
            memory: None,
            tile: None,
            overlap: crate::infer::tiling::DEFAULT_OVERLAP,
            context: RECEPTIVE_RADIUS,
            norm_stats: None,
            create_only: false,
            block: None,
            region: None,
            resume: false,
            pipeline: PipelineOptions::default(),
            sample_voxels: norm::DEFAULT_SAMPLE_VOXELS,
            read_options: Default::default(),
        }
    }
    fn blended(&self) -> bool {
        self.normalize == NormalizeMode::PerTile || self.context < RECEPTIVE_RADIUS
    }
}

/// What a run did, for `--json` and benchmarks.
#[derive(Clone, Debug, Serialize)]
pub struct InferSummary {
    pub input: String,
    pub output: String,
    pub format_in: String,
    pub format_out: String,
    pub dims: [usize; 3],
    /// Output voxels computed by this run.
    pub voxels: usize,
    pub seconds: f64,
    pub voxels_per_s: f64,
    pub tiling: String,
    pub tiles: usize,
    pub tiles_total: usize,
    pub tiles_skipped: usize,
    pub core: [usize; 3],
    pub window: [usize; 3],
    pub context: usize,
    pub memory_budget_bytes: usize,
    pub predictor: String,
    /// Why the run is not where it was asked to be (`Auto` fell back to the CPU), for
    /// the caller to show.
    pub device_note: Option<String>,
    /// Seconds per phase (reads and writes overlap compute; see `PhaseSeconds`).
    pub phases: PhaseSeconds,
    pub normalization_seconds: f64,
    pub normalization: Option<NormStats>,
    /// The output is the input: the normalization percentiles were equal.
    pub copied_input: bool,
    pub block: Option<[usize; 2]>,
    /// A full run into a store marked it complete.
    pub complete: bool,
    /// VmHWM of this process (bytes).
    pub peak_rss_bytes: Option<u64>,
    pub peak_device_bytes: Option<u64>,
}

/// `OUT/.rln/plan.json`: what every block of a store must agree on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StorePlan {
    pub format: String,
    pub plan: CorePlan,
    pub chunks: [usize; 3],
    pub output_dtype: OutputDtype,
    pub normalization: Option<NormStats>,
    pub rescale_output: bool,
    pub model: ModelIdentity,
    pub input: String,
}

pub const STORE_PLAN_FORMAT: &str = "rln-engine store-plan 1";

/// A model file's identity: its size and FNV-1a 64 hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub bytes: u64,
    pub fnv1a64: String,
    pub percentiles: [f64; 2],
}

impl ModelIdentity {
    pub fn of(path: &Path, percentiles: [f64; 2]) -> Result<Self> {
        let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &x in &b {
            h ^= x as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Ok(ModelIdentity {
            bytes: b.len() as u64,
            fnv1a64: format!("{h:016x}"),
            percentiles,
        })
    }
}

/// The `.rln` folder of a store.
pub fn meta_dir(store: &Path) -> PathBuf {
    store.join(".rln")
}

fn block_marker(store: &Path, i: usize, n: usize) -> PathBuf {
    meta_dir(store)
        .join("blocks")
        .join(n.to_string())
        .join(format!("{i}.done"))
}

/// Whether block `i` of `n` of `store` has finished (its marker exists).
pub fn block_done(store: &Path, i: usize, n: usize) -> bool {
    block_marker(store, i, n).is_file()
}

/// Peak resident memory of this process (VmHWM), if the kernel reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(l.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// MemAvailable of /proc/meminfo, if readable.
pub fn available_ram() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The default host memory for tiles: 4 GiB, or half the available RAM when less.
/// (Tiles of ~2·10⁷ voxels run the CPU network as fast per voxel as any larger; more
/// memory only makes a small volume one huge tile.)
pub fn default_memory() -> usize {
    let avail = available_ram().unwrap_or(8 << 30) / 2;
    avail.min(4 << 30)
}

/// Bytes per window voxel of the cores pipeline besides the predictor's own: the
/// prefetched input windows (C channels) and the cores waiting to be written.
pub fn pipeline_bytes_per_voxel(c_in: usize, prefetch: usize) -> usize {
    4 * c_in * (prefetch + 1) + 4 * prefetch
}

/// The largest window (voxels) that `memory` bytes allow.
pub fn choose_window(memory: usize, predictor_bytes_per_voxel: usize, c_in: usize, prefetch: usize) -> usize {
    (memory / (predictor_bytes_per_voxel + pipeline_bytes_per_voxel(c_in, prefetch))).max(16 * 16 * 16)
}

/// The network replaced by a copy of its (first) input channel.
pub struct CopyPredictor;

impl TilePredictor for CopyPredictor {
    fn describe(&self) -> String {
        "copy (no network: host pipeline only)".into()
    }
    fn predict(&mut self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let s = x.shape;
        let n = s.d * s.h * s.w;
        Tensor::from_vec(s.with_c(1), x.data[..n].to_vec())
    }
    fn bytes_per_voxel(&self) -> usize {
        4
    }
}

/// Makes the predictors of `choice`: one, or one per device of `--devices` (each
/// opens its own device ordinal and runs on its own worker thread), and a note for the
/// user when `Auto` fell back to the CPU (the caller shows it: the CLI prints it, the
/// bindings raise a warning).
pub fn make_predictors(
    choice: &PredictorChoice,
    model: &Model<f32>,
) -> Result<(Vec<Box<dyn TilePredictor>>, Option<String>)> {
    use crate::backend::cuda::{CudaOptions, CudaPredictor};
    use crate::infer::buffers::{open_predictor_with, Device};
    let cuda_opts = |precision: Precision, device: usize| CudaOptions {
        device,
        ..CudaOptions::of(precision)
    };
    match choice {
        PredictorChoice::Cpu => Ok((
            vec![Box::new(crate::infer::CpuPredictor { model: model.clone() })],
            None,
        )),
        PredictorChoice::Copy => Ok((vec![Box::new(CopyPredictor)], None)),
        PredictorChoice::Cuda { devices, precision } => {
            if devices.is_empty() {
                return Err(Error::invalid("--devices: name at least one CUDA device, e.g. 0"));
            }
            let mut seen = std::collections::BTreeSet::new();
            if let Some(d) = devices.iter().find(|&&d| !seen.insert(d)) {
                return Err(Error::invalid(format!(
                    "--devices names device {d} twice: give each device once"
                )));
            }
            let preds = devices
                .iter()
                .map(|&d| Ok(Box::new(CudaPredictor::new(model, cuda_opts(*precision, d))?) as Box<dyn TilePredictor>))
                .collect::<Result<_>>()?;
            Ok((preds, None))
        }
        PredictorChoice::Auto { precision } => {
            let (pred, note) = open_predictor_with(model, Device::Auto, *precision)?;
            let note = note.map(|n| match precision {
                Precision::F32 => n,
                p => format!("{n}; --{} applies to the GPU, the CPU computes in f32", p.suffix()),
            });
            Ok((vec![pred], note))
        }
    }
}

/// What one run into an output does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    /// Every tile.
    Full,
    /// Block i of n.
    Block(usize, usize),
    /// The tiles whose cores meet a region.
    Region(Region),
}

impl Job {
    fn progress_name(&self) -> String {
        match self {
            Job::Full => "full.json".into(),
            Job::Block(i, n) => format!("block-{i}-of-{n}.json"),
            Job::Region(r) => format!(
                "region-{}-{}-{}-{}-{}-{}.json",
                r.start[0], r.start[1], r.start[2], r.shape[0], r.shape[1], r.shape[2]
            ),
        }
    }
    fn tiles(&self, plan: &CorePlan) -> Result<Vec<usize>> {
        match *self {
            Job::Full => Ok((0..plan.count()).collect()),
            Job::Block(i, n) => Ok(plan.block_tiles(i, n)?.collect()),
            Job::Region(r) => plan.region_tiles(r),
        }
    }
}

/// The watermark of a job: how many of its tiles (in order) are written.
#[derive(Serialize, Deserialize)]
struct Watermark {
    tiles_written: usize,
}

/// What one streaming job computes: the views and their normalization, the tiling, which
/// of its tiles, where its watermark lives and how the pipeline runs.
#[derive(Clone, Copy)]
pub struct JobSpec<'a> {
    pub views: &'a [&'a dyn VolumeReader],
    pub norms: &'a [Affine],
    pub variant: Variant,
    pub plan: &'a CorePlan,
    pub job: Job,
    /// The store's metadata folder: the watermark is kept under it (none: no watermark).
    pub meta: Option<&'a Path>,
    /// Skip the tiles the watermark says a killed run already wrote.
    pub resume: bool,
    pub pipeline: PipelineOptions,
}

impl<'a> JobSpec<'a> {
    /// Every tile of `plan`, no watermark, default pipeline.
    pub fn full(views: &'a [&'a dyn VolumeReader], norms: &'a [Affine], variant: Variant, plan: &'a CorePlan) -> Self {
        JobSpec {
            views,
            norms,
            variant,
            plan,
            job: Job::Full,
            meta: None,
            resume: false,
            pipeline: PipelineOptions::default(),
        }
    }
    pub fn job(self, job: Job) -> Self {
        JobSpec { job, ..self }
    }
    /// Keeps the watermark under `meta`; `resume` continues from it.
    pub fn watermark(self, meta: &'a Path, resume: bool) -> Self {
        JobSpec {
            meta: Some(meta),
            resume,
            ..self
        }
    }
}

/// Runs `spec` into `writer` with the predictors `preds` (one worker thread each),
/// keeping a watermark under `spec.meta` (when given) so that `spec.resume` skips the
/// tiles a killed run already wrote. Returns the phase times and (tiles computed, tiles
/// skipped).
pub fn run_job(
    preds: &mut [&mut dyn TilePredictor],
    spec: &JobSpec,
    writer: &dyn VolumeWriter,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<(PhaseSeconds, usize, usize)> {
    let &JobSpec {
        views,
        norms,
        variant,
        plan,
        job,
        meta,
        resume,
        pipeline: opts,
    } = spec;
    let all = job.tiles(plan)?;
    let mark_path = meta.map(|m| m.join("progress").join(job.progress_name()));
    let mut skip = 0;
    if let (true, Some(p)) = (resume, &mark_path) {
        if let Ok(text) = std::fs::read_to_string(p) {
            let w: Watermark =
                serde_json::from_str(&text).map_err(|e| Error::format(p, format!("unreadable progress file ({e})")))?;
            skip = w.tiles_written.min(all.len());
        }
    }
    if let Some(p) = &mark_path {
        let dir = p.parent().expect("has a parent");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tiles = &all[skip..];
    // test hook: exit (as if killed) after this many tiles are written
    let stop_after: Option<usize> = std::env::var("RLN_TEST_STOP_AFTER_TILES")
        .ok()
        .and_then(|v| v.parse().ok());
    // the watermark is the prefix of the run's tiles that are all written (several
    // predictors finish tiles out of order)
    let written = Mutex::new((std::collections::BTreeSet::<usize>::new(), 0usize, 0usize));
    let save = |n: usize| -> Result<()> {
        if let Some(p) = &mark_path {
            let text = serde_json::to_string(&Watermark { tiles_written: n }).expect("serializable");
            crate::fsutil::write_atomic(p, text.as_bytes())?;
        }
        Ok(())
    };
    // The writer thread calls this after each core is written: the watermark is saved
    // when the prefix grows (a few bytes per tile of millions of voxels).
    let on_written = |pos: usize| {
        let mut w = written.lock().unwrap_or_else(|e| e.into_inner());
        let (done, prefix, count) = &mut *w;
        done.insert(pos);
        *count += 1;
        let before = *prefix;
        while done.remove(prefix) {
            *prefix += 1;
        }
        if *prefix > before {
            // a failed save only costs recomputation after a kill
            let _ = save(skip + *prefix);
        }
        if stop_after.is_some_and(|k| *count >= k) {
            eprintln!("RLN_TEST_STOP_AFTER_TILES: stopping after {count} tile(s)");
            std::process::exit(75);
        }
    };
    let hooks = PipelineHooks {
        written: &on_written,
        progress,
    };
    let t = pipeline::run_tiles(preds, views, norms, variant, writer, plan, tiles, opts, &hooks)?;
    save(all.len())?;
    Ok((t, tiles.len(), skip))
}

/// Normalization of every view: the model's fixed values when it has them; else from
/// `--norm-stats` when the file exists, else sampled (and written to the file when one
/// is named).
fn normalization(
    opts: &InferFileOptions,
    views: &[&dyn VolumeReader],
    pct: [f64; 2],
    fixed: Option<&FixedNorm>,
) -> Result<NormStats> {
    let dims = views[0].dims();
    if let Some(f) = fixed {
        if let Some(p) = &opts.norm_stats {
            eprintln!(
                "note: --norm-stats {}: the model normalizes with fixed values ({}..{}), so nothing is sampled and the file is neither read nor written",
                p.display(),
                f.low,
                f.high
            );
        }
        return Ok(NormStats {
            format: NORM_STATS_FORMAT.into(),
            dims,
            percentiles: pct,
            views: vec![ViewStats::of_fixed(f); views.len()],
        });
    }
    if let Some(p) = &opts.norm_stats {
        if p.exists() {
            return NormStats::load_checked(p, dims, pct, views.len());
        }
    }
    let stats: Vec<ViewStats> = views
        .iter()
        .map(|v| norm::sample_stats(*v, pct, opts.sample_voxels))
        .collect::<Result<_>>()?;
    let s = NormStats {
        format: NORM_STATS_FORMAT.into(),
        dims,
        percentiles: pct,
        views: stats,
    };
    if let Some(p) = &opts.norm_stats {
        s.save(p)?;
    }
    Ok(s)
}

/// What `infer --create-only` does (and a `plan` command may call): measures or reads
/// the normalization, creates the output store and its plan `OUT/.rln/plan.json`, and
/// computes nothing.
pub fn create_store(opts: &InferFileOptions) -> Result<InferSummary> {
    let mut o = opts.clone();
    o.create_only = true;
    infer_file(&o)
}

/// Streams `opts.input` (and `input2`) through the network into `opts.output`.
pub fn infer_file(opts: &InferFileOptions) -> Result<InferSummary> {
    let t0 = Instant::now();
    let mut model = Model::<f32>::load(&opts.model)?;
    if let Some(p) = opts.percentiles {
        // the user's percentiles replace the model's normalization, fixed or not
        model.config.norm_fixed = None;
        model.config.norm_percentiles = p;
        model
            .config
            .validate()
            .map_err(|e| Error::invalid(format!("--percentiles {},{}: {e}", p[0], p[1])))?;
    }
    let variant = model.config.variant;
    let pct = model.config.norm_percentiles;
    check_inputs(opts, variant)?;
    let store = files::is_store(&opts.output);
    let job = match (opts.block, opts.region) {
        (Some(_), Some(_)) => return Err(Error::invalid("--block and --region exclude each other: give one")),
        (Some((i, n)), None) => {
            plan::check_block(i, n)?;
            Job::Block(i, n)
        }
        (None, Some(r)) => Job::Region(r),
        (None, None) => Job::Full,
    };
    let partial = job != Job::Full;
    if (partial || opts.create_only || opts.resume) && !store {
        return Err(Error::invalid(format!(
            "--block, --region, --resume and --create-only write into a chunked store (an OME-Zarr folder named *.zarr); {} is not one",
            opts.output.display()
        )));
    }
    if opts.normalize == NormalizeMode::PerTile && model.config.norm_fixed.is_some() {
        return Err(Error::invalid(
            "--normalize per-tile: this model normalizes every volume with fixed values (train --fixed-norm), \
             not by percentiles; use the default global normalization, or give --percentiles to normalize by them",
        ));
    }
    if (partial || opts.create_only || opts.resume) && opts.blended() {
        return Err(Error::invalid(
            "--block, --region, --resume and --create-only need the default tiling (global normalization, --context ≥ 18); the blended tiling of --context 0 / --normalize per-tile does not split into independent chunks",
        ));
    }
    if store && !partial && !opts.resume && !opts.create_only && opts.output.exists() {
        return Err(Error::invalid(format!(
            "{} exists: pass --resume to continue it, or remove it to start again",
            opts.output.display()
        )));
    }
    if partial && !opts.output.exists() {
        return Err(Error::invalid(format!(
            "{} does not exist: create it first with `infer --create-only` (same model, input and options), then run the blocks",
            opts.output.display()
        )));
    }
    if !store {
        crate::fsutil::check_output_dir(&opts.output)?;
    }

    // inputs
    let t_read = Instant::now();
    let r1 = files::open_input(&opts.input, &opts.read_options)?;
    let r2 = match &opts.input2 {
        Some(p) => Some(files::open_input(p, &opts.read_options)?),
        None => None,
    };
    let mut views: Vec<&dyn VolumeReader> = vec![r1.as_ref()];
    if let Some(r) = &r2 {
        views.push(r.as_ref());
    }
    let dims = r1.dims();
    if let Some(r) = &r2 {
        if r.dims() != dims {
            return Err(Error::Shape(format!(
                "the two views differ in size: {:?} vs {:?}; register and resample them to one grid first",
                dims,
                r.dims()
            )));
        }
    }
    let open_seconds = t_read.elapsed().as_secs_f64();

    let existing = if store && opts.output.exists() {
        Some(load_store_plan(&opts.output)?)
    } else {
        None
    };
    let identity = ModelIdentity::of(&opts.model, pct)?;

    // normalization
    let t_norm = Instant::now();
    let stats = if opts.normalize == NormalizeMode::Global {
        match &existing {
            Some(sp) if opts.norm_stats.as_ref().is_none_or(|p| !p.exists()) => sp.normalization.clone(),
            _ => Some(normalization(opts, &views, pct, model.config.norm_fixed.as_ref())?),
        }
    } else {
        None
    };
    let normalization_seconds = t_norm.elapsed().as_secs_f64();
    let copied_input = stats
        .as_ref()
        .is_some_and(|s| s.views.iter().any(|v| v.is_degenerate()));
    if copied_input {
        eprintln!(
            "warning: the input's {} and {} percentiles are equal (a constant volume): nothing to deconvolve; the output is the input unchanged",
            pct[0], pct[1]
        );
    }
    let (norms, rescale): (Vec<Affine>, bool) = if copied_input {
        (vec![Affine::from_percentile_values(0.0, 0.0); views.len()], true)
    } else {
        (
            stats.as_ref().map(|s| s.affines()).unwrap_or_default(),
            opts.rescale_output,
        )
    };

    let (mut preds, device_note): (Vec<Box<dyn TilePredictor>>, Option<String>) = if copied_input {
        (vec![Box::new(CopyPredictor)], None)
    } else {
        make_predictors(&opts.predictor, &model)?
    };
    let pred = &preds[0];
    let describe = if preds.len() > 1 {
        format!("{} × {}", preds.len(), pred.describe())
    } else {
        pred.describe()
    };
    let c_in = variant.input_channels();
    let memory = opts.memory.or(pred.memory_budget()).unwrap_or_else(default_memory);
    let window_voxels = choose_window(memory, pred.bytes_per_voxel(), c_in, opts.pipeline.prefetch);
    let desired = opts
        .tile
        .unwrap_or_else(|| plan::budget_core(dims, opts.context, window_voxels));

    if opts.blended() {
        // several devices share each z-row's tiles; blended in tile order as with one
        let shared: Vec<&mut dyn TilePredictor> = preds
            .iter_mut()
            .map(|p| -> &mut dyn TilePredictor { &mut **p })
            .collect();
        let mut pool = crate::infer::pool::PredictorPool::new(shared)?;
        return run_blended(
            opts,
            &mut pool,
            &views,
            &norms,
            variant,
            pct,
            desired,
            dims,
            open_seconds,
            normalization_seconds,
            memory,
            stats,
            t0,
        )
        .map(|summary| InferSummary { device_note, ..summary });
    }

    // the output and its plan
    let spec = WriterSpec {
        dims,
        dtype: opts.output_dtype,
        chunks: opts.chunks,
        voxel_size: r1.info().voxel_size,
        metadata: r1.info().metadata.clone(),
    };
    let (writer, sp) = match existing {
        Some(sp) => {
            check_store_plan(&opts.output, &sp, dims, &identity, stats.as_ref(), opts)?;
            let w = files::open_existing_store(&opts.output)?;
            if w.write_unit() != sp.chunks || w.dims() != dims {
                return Err(Error::invalid(format!(
                    "{}: the store's array ({:?} in units of {:?}) is not the one its plan was made for ({dims:?} in {:?}); create a new store",
                    opts.output.display(),
                    w.dims(),
                    w.write_unit(),
                    sp.chunks
                )));
            }
            (w, sp)
        }
        None => {
            let w = files::create_output(&opts.output, &spec)?;
            let (core, _aligned) = CorePlan::align_core(dims, desired, w.write_unit());
            let sp = StorePlan {
                format: STORE_PLAN_FORMAT.into(),
                plan: CorePlan::new(dims, core, opts.context)?,
                chunks: w.write_unit(),
                output_dtype: opts.output_dtype,
                normalization: stats.clone(),
                rescale_output: rescale,
                model: identity.clone(),
                input: opts.input.display().to_string(),
            };
            if store {
                save_store_plan(&opts.output, &sp)?;
            }
            (w, sp)
        }
    };
    let plan = sp.plan.clone();
    let mut summary = InferSummary {
        input: opts.input.display().to_string(),
        output: opts.output.display().to_string(),
        format_in: files::format_name(&opts.input).into(),
        format_out: files::format_name(&opts.output).into(),
        dims,
        voxels: 0,
        seconds: 0.0,
        voxels_per_s: 0.0,
        tiling: "cores".into(),
        tiles: 0,
        tiles_total: plan.count(),
        tiles_skipped: 0,
        core: plan.core,
        window: plan.max_window(),
        context: plan.context,
        memory_budget_bytes: memory,
        predictor: describe.clone(),
        device_note: device_note.clone(),
        phases: PhaseSeconds::default(),
        normalization_seconds,
        normalization: stats.clone(),
        copied_input,
        block: opts.block.map(|(i, n)| [i, n]),
        complete: false,
        peak_rss_bytes: None,
        peak_device_bytes: None,
    };
    summary.phases.read = open_seconds;
    if opts.create_only {
        // not `finish`: that marks a new store complete; the blocks fill it
        drop(writer);
        summary.seconds = t0.elapsed().as_secs_f64();
        summary.peak_rss_bytes = peak_rss_bytes();
        return Ok(summary);
    }
    if let (true, Job::Block(i, n)) = (opts.resume, job) {
        if block_done(&opts.output, i, n) {
            eprintln!(
                "block {i}/{n} of {} is done already (--resume): nothing to do",
                opts.output.display()
            );
            summary.seconds = t0.elapsed().as_secs_f64();
            return Ok(summary);
        }
    }
    let planned = job.tiles(&plan)?.len();
    eprintln!(
        "{} on {describe}: {planned} of {} tile(s), cores {:?}, windows up to {:?} (context {}), memory budget {:.2} GB",
        opts.input.display(),
        plan.count(),
        plan.core,
        plan.max_window(),
        plan.context,
        memory as f64 / 1e9
    );
    let bar = crate::imaging::progress::bar(
        job.tiles(&plan)?
            .iter()
            .map(|&k| plan.tile(k).core.voxels() as u64)
            .sum(),
        "voxels",
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>8} [{bar:40}] {percent}% {human_pos}/{human_len} voxels ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let progress = |v: usize| bar.inc(v as u64);
    let meta = if store { Some(meta_dir(&opts.output)) } else { None };
    let mut workers: Vec<&mut dyn TilePredictor> =
        preds.iter_mut().map(|p| &mut **p as &mut dyn TilePredictor).collect();
    let spec = JobSpec {
        views: &views,
        norms: &norms,
        variant,
        plan: &plan,
        job,
        meta: meta.as_deref(),
        resume: opts.resume,
        pipeline: PipelineOptions {
            rescale_output: sp.rescale_output,
            ..opts.pipeline
        },
    };
    let (phases, computed, skipped) = run_job(&mut workers, &spec, writer.as_ref(), &progress)?;
    bar.finish_and_clear();
    let t_fin = Instant::now();
    writer.finish()?;
    let finish_seconds = t_fin.elapsed().as_secs_f64();
    match job {
        Job::Full if store => {
            files::mark_store_complete(&opts.output)?;
            summary.complete = true;
        }
        Job::Block(i, n) => {
            let m = block_marker(&opts.output, i, n);
            let dir = m.parent().expect("has a parent");
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            crate::fsutil::write_atomic(&m, format!("{{\"tiles\": {computed}}}\n").as_bytes())?;
        }
        _ => {}
    }
    summary.phases = phases;
    summary.phases.read += open_seconds;
    summary.phases.write += finish_seconds;
    summary.tiles = computed;
    summary.tiles_skipped = skipped;
    let tiles = job.tiles(&plan)?;
    summary.voxels = tiles[skipped..].iter().map(|&k| plan.tile(k).core.voxels()).sum();
    summary.seconds = t0.elapsed().as_secs_f64();
    summary.voxels_per_s = summary.voxels as f64 / summary.seconds.max(1e-9);
    summary.peak_rss_bytes = peak_rss_bytes();
    Ok(summary)
}

fn check_inputs(opts: &InferFileOptions, variant: Variant) -> Result<()> {
    if variant.views() == 2 && opts.input2.is_none() {
        return Err(Error::invalid(format!(
            "{} is an RLN-dual model ({variant:?}): give the second view with --input2",
            opts.model.display()
        )));
    }
    if variant.views() == 1 && opts.input2.is_some() {
        return Err(Error::invalid(format!(
            "{} is a single-view model: --input2 does not apply",
            opts.model.display()
        )));
    }
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    };
    for i in std::iter::once(&opts.input).chain(opts.input2.as_ref()) {
        if same(i, &opts.output) {
            return Err(Error::invalid(format!(
                "the output {} is an input: choose another -o path",
                opts.output.display()
            )));
        }
    }
    Ok(())
}

fn plan_path(store: &Path) -> PathBuf {
    meta_dir(store).join("plan.json")
}

fn save_store_plan(store: &Path, sp: &StorePlan) -> Result<()> {
    let dir = meta_dir(store);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let text = serde_json::to_string_pretty(sp).map_err(|e| Error::invalid(e.to_string()))?;
    crate::fsutil::write_atomic(&plan_path(store), text.as_bytes())
}

/// Reads `OUT/.rln/plan.json`.
pub fn load_store_plan(store: &Path) -> Result<StorePlan> {
    let p = plan_path(store);
    let text = std::fs::read_to_string(&p).map_err(|_| {
        Error::invalid(format!(
            "{} has no run plan ({}): it was not made by `infer --create-only` or an interrupted `infer`; remove it or choose another output",
            store.display(),
            p.display()
        ))
    })?;
    let sp: StorePlan =
        serde_json::from_str(&text).map_err(|e| Error::format(&p, format!("not a store plan ({e})")))?;
    if sp.format != STORE_PLAN_FORMAT {
        return Err(Error::format(
            &p,
            format!("format {:?}, expected {STORE_PLAN_FORMAT:?}", sp.format),
        ));
    }
    Ok(sp)
}

/// Refuses a store made for another input, model, normalization or options.
fn check_store_plan(
    store: &Path,
    sp: &StorePlan,
    dims: [usize; 3],
    model: &ModelIdentity,
    stats: Option<&NormStats>,
    opts: &InferFileOptions,
) -> Result<()> {
    let bad = |what: String| {
        Err(Error::invalid(format!(
            "{} was planned for another run ({what}): use the model, input and options it was created with, or create a new store",
            store.display()
        )))
    };
    if sp.plan.dims != dims {
        return bad(format!("input of {:?} voxels, this input is {dims:?}", sp.plan.dims));
    }
    if &sp.model != model {
        return bad(format!(
            "model {} ({} bytes, percentiles {:?}), this model is {} ({} bytes, percentiles {:?})",
            sp.model.fnv1a64, sp.model.bytes, sp.model.percentiles, model.fnv1a64, model.bytes, model.percentiles
        ));
    }
    if sp.plan.context != opts.context {
        return bad(format!("context {}, this run {}", sp.plan.context, opts.context));
    }
    if sp.normalization.as_ref().map(|s| &s.views) != stats.map(|s| &s.views) {
        return bad("other normalization statistics (--norm-stats)".into());
    }
    if sp.output_dtype != opts.output_dtype {
        return bad(format!(
            "output type {:?}, this run {:?}",
            sp.output_dtype, opts.output_dtype
        ));
    }
    Ok(())
}

/// The blended tiling (context < receptive radius, or per-tile normalization):
/// `stitch::run_tiled` over z-bands read from the readers, planes written through.
#[allow(clippy::too_many_arguments)]
fn run_blended(
    opts: &InferFileOptions,
    pred: &mut dyn TilePredictor,
    views: &[&dyn VolumeReader],
    norms: &[Affine],
    variant: Variant,
    pct: [f64; 2],
    core: [usize; 3],
    dims: [usize; 3],
    open_seconds: f64,
    normalization_seconds: f64,
    memory: usize,
    stats: Option<NormStats>,
    t0: Instant,
) -> Result<InferSummary> {
    let spec = WriterSpec {
        dims,
        dtype: opts.output_dtype,
        chunks: opts.chunks,
        voxel_size: views[0].info().voxel_size,
        metadata: views[0].info().metadata.clone(),
    };
    let writer = files::create_output(&opts.output, &spec)?;
    let tplan = TilePlan::new(dims, core, opts.overlap, opts.context)?;
    let sopts = StitchOptions {
        plan: tplan.clone(),
        normalize: opts.normalize,
        percentiles: pct,
        rescale_output: opts.rescale_output,
        variant,
    };
    let describe = pred.describe();
    eprintln!(
        "{} on {describe}: {} blended tile(s) of at most {:?} voxels (core {core:?}, overlap {:?}, context {}), {:?} normalization",
        opts.input.display(),
        tplan.count(),
        tplan.max_window(),
        opts.overlap,
        opts.context,
        opts.normalize
    );
    let mut sources: Vec<ReaderPlanes> = views
        .iter()
        .map(|v| ReaderPlanes {
            reader: *v,
            buf: Vec::new(),
        })
        .collect();
    let mut srcs: Vec<&mut dyn PlaneSource> = sources.iter_mut().map(|s| s as &mut dyn PlaneSource).collect();
    let mut sink = WriterPlanes {
        writer: writer.as_ref(),
        dims,
        unit_z: writer.write_unit()[0].clamp(1, dims[0]),
        pending: Vec::new(),
        pending_z0: 0,
    };
    let bar = crate::imaging::progress::bar(tplan.count() as u64, "tiles");
    let t = run_tiled(pred, &mut srcs, norms, &mut sink, &sopts, &mut |d, _| {
        bar.set_position(d as u64)
    })?;
    sink.flush()?;
    bar.finish_and_clear();
    let tw = Instant::now();
    writer.finish()?;
    let voxels: usize = dims.iter().product();
    let seconds = t0.elapsed().as_secs_f64();
    Ok(InferSummary {
        input: opts.input.display().to_string(),
        output: opts.output.display().to_string(),
        format_in: files::format_name(&opts.input).into(),
        format_out: files::format_name(&opts.output).into(),
        dims,
        voxels,
        seconds,
        voxels_per_s: voxels as f64 / seconds.max(1e-9),
        tiling: "blended".into(),
        tiles: tplan.count(),
        tiles_total: tplan.count(),
        tiles_skipped: 0,
        core,
        window: tplan.max_window(),
        context: opts.context,
        memory_budget_bytes: memory,
        predictor: describe,
        device_note: None,
        phases: PhaseSeconds {
            read: open_seconds + t.read,
            normalize: t.cut,
            transfer: 0.0,
            compute: t.predict,
            blend: t.blend,
            write: t.emit + tw.elapsed().as_secs_f64(),
            wall: seconds,
        },
        normalization_seconds,
        normalization: stats,
        copied_input: false,
        block: None,
        complete: false,
        peak_rss_bytes: peak_rss_bytes(),
        peak_device_bytes: None,
    })
}

/// A reader as a source of z-bands of whole planes (the blended tiling).
struct ReaderPlanes<'a> {
    reader: &'a dyn VolumeReader,
    buf: Vec<f32>,
}

impl PlaneSource for ReaderPlanes<'_> {
    fn dims(&self) -> [usize; 3] {
        self.reader.dims()
    }
    fn read_planes(&mut self, z0: usize, z1: usize) -> Result<std::borrow::Cow<'_, [f32]>> {
        let [_, h, w] = self.reader.dims();
        let r = Region::new([z0, 0, 0], [z1 - z0, h, w]);
        self.buf.clear();
        self.buf.resize(r.voxels(), 0.0);
        self.reader.read_region(r, &mut self.buf)?;
        Ok(std::borrow::Cow::Borrowed(&self.buf))
    }
}

/// Finished planes written in whole units of z.
struct WriterPlanes<'a> {
    writer: &'a dyn VolumeWriter,
    dims: [usize; 3],
    unit_z: usize,
    pending: Vec<f32>,
    pending_z0: usize,
}

impl WriterPlanes<'_> {
    fn flush(&mut self) -> Result<()> {
        let plane = self.dims[1] * self.dims[2];
        let n = self.pending.len() / plane;
        if n > 0 {
            let r = Region::new([self.pending_z0, 0, 0], [n, self.dims[1], self.dims[2]]);
            self.writer.write_region(r, &self.pending)?;
            self.pending_z0 += n;
            self.pending.clear();
        }
        Ok(())
    }
}

impl PlaneSink for WriterPlanes<'_> {
    fn write_planes(&mut self, _z0: usize, planes: &[f32]) -> Result<()> {
        if let Some(i) = planes.iter().position(|v| !v.is_finite()) {
            return Err(Error::Numeric(format!(
                "the prediction is not finite at output voxel {} of a band: check the model and the input's range",
                i
            )));
        }
        let plane = self.dims[1] * self.dims[2];
        self.pending.extend_from_slice(planes);
        // write whole units of z; keep the remainder
        let n = self.pending.len() / plane;
        let whole = n / self.unit_z * self.unit_z;
        if whole > 0 {
            let r = Region::new([self.pending_z0, 0, 0], [whole, self.dims[1], self.dims[2]]);
            self.writer.write_region(r, &self.pending[..whole * plane])?;
            self.pending.drain(..whole * plane);
            self.pending_z0 += whole;
        }
        Ok(())
    }
}
