//! `rln-engine train` as a library entry: its options (parsed by clap, the same flags
//! and defaults for every caller) and the whole run (data, device, loop, checkpoints,
//! log, output files), so that the command line and the bindings (Python's
//! `rln_engine.train(...)`) train the same way. [`parse_args`] reads the flags from a
//! list of strings; [`train`] runs them.

pub use crate::args::Device;
use crate::args::{parse_dims, parse_range};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{self, CudaTrainBackend};
use crate::backend::loss::LossTerms;
use crate::backend::{GradMode, TrainPrecision};
use crate::error::{Error, Result, ResultExt};
use crate::imaging::acquisition::{self, AcquisitionEstimate};
use crate::imaging::io::{read_volume, read_volume_with, ReadOptions};
use crate::imaging::normalize::percentiles;
use crate::imaging::synth::{Family, SynthConfig};
use crate::model::{FixedNorm, Model, ModelConfig, Variant};
use crate::train::adam::LrSchedule;
use crate::train::data::{CropSampler, Dataset, SynthVariation, TargetScale};
use crate::train::trainer::{self, TrainConfig, TrainObserver, TrainState, ValMetrics};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training pairs: DIR/input/ and DIR/ground_truth/ with matching file names.
    #[arg(long, required_unless_present_any = ["synth_psf", "resume"])]
    pub data: Option<PathBuf>,
    /// Held-out pairs (same layout) for validation after every epoch.
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Second view of every training input (RLN-dual), same file names as DIR/input/;
    /// default DIR/input2/ (and VAL/input2/ for validation) with a dual variant.
    #[arg(long)]
    pub input2: Option<PathBuf>,
    /// Network variant; dual variants need a second view of every input (--input2).
    #[arg(long, value_enum, default_value_t = Variant::Single)]
    pub variant: Variant,
    /// Make training pairs on the fly from this PSF instead of reading --data.
    #[arg(long)]
    pub synth_psf: Option<PathBuf>,
    /// With --synth-psf: estimate from this raw volume (the kind the model will be applied
    /// to) its camera offset and gain, read noise, background, photon level and density of
    /// structures, and make the synthetic pairs match them, measured on synthetic probe
    /// volumes made with the PSF: photons per unit from the raw's bright end, density from
    /// its bright-voxel fraction, the scene's background from its floor less the structures'
    /// out-of-focus haze; its read noise. Printed and recorded in the model. The PSF must be
    /// sampled like it.
    #[arg(long, value_name = "RAW", requires = "synth_psf", conflicts_with_all = ["photons", "synth_density"])]
    pub like: Option<PathBuf>,
    /// With --synth-psf: number of training volumes.
    #[arg(long, default_value_t = 16)]
    pub synth_count: usize,
    /// With --synth-psf: number of validation volumes (other seeds), used when --val is absent.
    #[arg(long, default_value_t = 2)]
    pub synth_val_count: usize,
    /// With --synth-psf: size of each synthetic volume (z,y,x).
    #[arg(long, value_parser = parse_dims, default_value = "128,128,128")]
    pub synth_size: [usize; 3],
    /// With --synth-psf: phantom families to leave out (e.g. filaments).
    #[arg(long, value_delimiter = ',')]
    pub exclude_family: Vec<Family>,
    /// With --synth-psf: object density per volume, drawn log-uniformly from LOW,HIGH
    /// (1 is the authors' density; a range shows the network sparse and crowded scenes).
    #[arg(long, value_parser = parse_range, default_value = "1,1")]
    pub synth_density: (f64, f64),
    /// With --synth-psf: photons per unit of ground truth (the authors': 5); LOW,HIGH draws
    /// each volume's level log-uniformly (dim and bright scenes).
    #[arg(long, value_parser = parse_range, default_value = "5")]
    pub photons: (f64, f64),
    /// With --synth-psf: this fraction of the volumes (0.5 if the flag has no value) holds
    /// a random subset of the families instead of all of them, so that scenes whose
    /// brightest structures are thin ones (dots, rods, plates) occur in training too;
    /// without it the network under-sharpens such scenes.
    #[arg(long, value_parser = crate::args::finite_f64, value_name = "FRACTION", num_args = 0..=1, default_missing_value = "0.5")]
    pub synth_family_subsets: Option<f64>,
    /// Output model file (the final weights). With validation data, the weights with the
    /// lowest validation loss are also kept, as OUTPUT with .best.safetensors.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Optimizer steps (the authors': 10 000).
    #[arg(long, default_value_t = 10_000)]
    pub steps: u64,
    /// Steps per epoch (validation after each).
    #[arg(long, default_value_t = 100)]
    pub epoch_steps: u64,
    /// Crops per batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Crop size (z,y,x or one number).
    #[arg(long, value_parser = parse_dims, default_value = "64")]
    pub crop: [usize; 3],
    /// Input normalization percentiles LOW,HIGH of every crop (the authors': 0.01,99.5);
    /// recorded in the model, so inference normalizes the same way. A higher HIGH keeps
    /// sparse specimens, whose 99.5th percentile falls in the background, in range.
    /// Default: the authors' 0.01,99.5, or those of the --init model.
    #[arg(long, value_parser = parse_range)]
    pub percentiles: Option<(f64, f64)>,
    /// Multiply each crop's normalized input by a factor drawn log-uniformly from
    /// LOW,HIGH (e.g. 0.5,2): robustness to the input's scale, which a sparse specimen's
    /// normalization shifts. Default: off (the authors' recipe).
    #[arg(long, value_parser = parse_range)]
    pub input_scale: Option<(f64, f64)>,
    /// How each crop's ground truth becomes the target. own: the authors' (its own
    /// percentiles). input-flux: scaled by the pair's input/ground-truth flux ratio and
    /// normalized with the input crop's map, so the gain the network must apply to a
    /// structure does not depend on what else is in the crop (for pairs whose ground
    /// truth holds the input's total flux, e.g. --synth-psf pairs).
    #[arg(long, value_enum, default_value_t = TargetScale::Own)]
    pub target_scale: TargetScale,
    /// Normalize every crop, and at inference every volume, by fixed values (LO → 0,
    /// HI → 1) instead of its own percentiles, so that a structure's brightness keeps its
    /// meaning: a scene of thin, dim structures is not stretched to the range large
    /// objects set. For a model matched with --like to one acquisition setting; use with
    /// --target-scale input-flux. `like`: the --like raw volume's percentiles
    /// (--percentiles, or the model's), in its raw units, with the camera offset and gain
    /// --like estimated (the synthetic crops, in photons, go through that camera), so the
    /// model applies to raw data of that camera and setting. LO,HI: these values, in the
    /// units of the training inputs (and of the volumes the model will be applied to).
    /// Recorded in the model; `infer --percentiles` replaces it. Default: percentiles (or
    /// the --init model's fixed values).
    #[arg(long, value_name = "like|LO,HI", value_parser = parse_fixed_norm, conflicts_with = "resume")]
    pub fixed_norm: Option<FixedNormArg>,
    /// Base learning rate.
    #[arg(long, value_parser = crate::args::finite_f64, default_value_t = 0.015)]
    pub lr: f64,
    /// Learning-rate decay factor per --lr-decay-steps (continuous).
    #[arg(long, value_parser = crate::args::finite_f64, default_value_t = 0.95)]
    pub lr_decay: f64,
    #[arg(long, value_parser = crate::args::finite_f64, default_value_t = 600.0)]
    pub lr_decay_steps: f64,
    /// Gradient rules: the authors' custom gradients (paper) or the true gradient (exact).
    #[arg(long, value_enum, default_value_t = GradMode::Paper)]
    pub grad_mode: GradMode,
    /// ε of the RL division nodes of a new model (the authors' later code: 1e-3).
    #[arg(long, value_parser = crate::args::finite_f64, default_value_t = 1e-3)]
    pub div_eps: f64,
    /// Seed of initialization, crop sampling and synthetic data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every N steps (default: every epoch) and at the end.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoint file (default: OUTPUT with .ckpt.safetensors).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// At every checkpoint also keep the model alone as OUTPUT with .step<N>.safetensors
    /// (N zero-padded to 5 digits), to choose among a run's checkpoints afterwards; each
    /// equals the final model of the same command with --steps N.
    #[arg(long)]
    pub keep_checkpoints: bool,
    /// Start from these weights instead of the authors' initialization (fine-tuning; a
    /// new run with a fresh optimizer, unlike --resume).
    #[arg(long, conflicts_with = "resume")]
    pub init: Option<PathBuf>,
    /// Continue a run from its checkpoint (same data; --steps may extend it).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// JSON-lines log (default: OUTPUT with .log.jsonl).
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Where the network trains: cpu, cuda (the GPU: the whole step — forward, loss,
    /// backward, Adam — on the device, recorded once as a CUDA graph and replayed; crops
    /// and checkpoints on the host; RLN_CUDA_GRAPHS=0 runs it op by op), or auto (cuda
    /// when usable).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Arithmetic of the convs: fp32 (the default), or mixed — a CUDA option: the wide
    /// convs (forward, data and weight gradients) on the tensor cores with bf16 operands
    /// and f32 accumulation; FP32 master weights, the RL division and update, the loss,
    /// batch-norm statistics and Adam stay FP32/f64. A resumed run keeps its checkpoint's
    /// precision unless this is given.
    #[arg(long, value_enum)]
    pub precision: Option<TrainPrecision>,
    /// Leave the command line, timings and thread count out of the model file, so that
    /// identical runs (and a resumed run and the same run uninterrupted) write
    /// byte-identical files that `cmp` can compare.
    #[arg(long)]
    pub reproducible: bool,
    /// Channel of a multi-channel --synth-psf file, from 0.
    #[arg(long)]
    pub channel: Option<usize>,
    /// Time point of a --synth-psf file with several, from 0.
    #[arg(long)]
    pub time: Option<usize>,
    /// Stop (as if killed) after this many total steps, leaving the checkpoint (for tests).
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
}

/// The training options from command-line flags (without the program and subcommand
/// names), e.g. `["--synth-psf", "psf.tif", "-o", "m.safetensors", "--steps", "100"]`;
/// an error (with clap's message, or the help text for `--help`) when they do not parse.
pub fn parse_args<I, T>(flags: I) -> Result<TrainArgs, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::Parser;
    #[derive(Parser)]
    #[command(name = "train", about = "Train an RLN model")]
    struct Flags {
        #[command(flatten)]
        args: TrainArgs,
    }
    let argv = std::iter::once(std::ffi::OsString::from("train")).chain(flags.into_iter().map(Into::into));
    Ok(Flags::try_parse_from(argv)?.args)
}

fn sibling(out: &Path, ext: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    out.with_file_name(format!("{stem}.{ext}"))
}

struct CliObserver {
    bar: ProgressBar,
    log: std::fs::File,
    start: Instant,
    ckpt: PathBuf,
    data_fp: Vec<(String, [usize; 3])>,
    last_val: Option<ValMetrics>,
    /// Where the model with the lowest validation loss so far is kept, and that loss.
    best_path: PathBuf,
    best: Option<(u64, ValMetrics)>,
    provenance: String,
    /// With --keep-checkpoints: OUTPUT, whose .step<N> siblings keep each checkpoint's model.
    keep_models_of: Option<PathBuf>,
}

impl TrainObserver for CliObserver {
    fn on_step(&mut self, step: u64, t: &LossTerms, lr: f64) {
        self.bar.set_position(step);
        let v = self
            .last_val
            .as_ref()
            .map(|v| format!(" val psnr {:.2} ssim {:.3}", v.psnr, v.ssim))
            .unwrap_or_default();
        self.bar.set_message(format!("loss {:.4}{v}", t.loss));
        let line = serde_json::json!({"step": step, "loss": t.loss, "mse": t.mse, "mse_aux": t.mse_aux, "ssim": t.ssim, "lr": lr,
            "elapsed_s": self.start.elapsed().as_secs_f64()});
        let _ = writeln!(self.log, "{line}");
    }
    fn on_validation(&mut self, step: u64, m: &ValMetrics, model: &Model<f32>) -> crate::Result<()> {
        if self.best.as_ref().is_none_or(|(_, b)| m.loss < b.loss) {
            let mut best = model.clone();
            best.config.provenance = self.provenance.clone();
            best.config.training = Some(serde_json::json!({"lowest_validation_loss_at_step": step, "validation": m}));
            best.save(&self.best_path)?;
            self.best = Some((step, m.clone()));
        }
        let line = serde_json::json!({"step": step, "val_loss": m.loss, "val_psnr": m.psnr, "val_ssim": m.ssim, "val_pairs": m.pairs,
            "elapsed_s": self.start.elapsed().as_secs_f64()});
        let _ = writeln!(self.log, "{line}");
        if !self.bar.is_hidden() {
            self.bar.println(format!(
                "step {step}: validation loss {:.4}, PSNR {:.2} dB, SSIM {:.4}",
                m.loss, m.psnr, m.ssim
            ));
        } else {
            eprintln!(
                "step {step}: validation loss {:.4}, PSNR {:.2} dB, SSIM {:.4}",
                m.loss, m.psnr, m.ssim
            );
        }
        self.last_val = Some(m.clone());
        Ok(())
    }
    fn on_checkpoint(&mut self, state: &TrainState, cfg: &TrainConfig) -> crate::Result<()> {
        trainer::save_checkpoint(&self.ckpt, state, cfg, &self.data_fp)?;
        if let Some(out) = &self.keep_models_of {
            let mut m = state.model.clone();
            m.config.provenance = format!("{} (its weights at step {})", self.provenance, state.step);
            m.save(&sibling(out, &format!("step{:05}.safetensors", state.step)))?;
        }
        Ok(())
    }
}

fn synth_config(a: &TrainArgs) -> SynthConfig {
    SynthConfig {
        size: a.synth_size,
        photons: a.photons.0,
        families: Family::ALL
            .into_iter()
            .filter(|f| !a.exclude_family.contains(f))
            .collect(),
        ..SynthConfig::default()
    }
}

/// Rewrites the JSON-lines log of a resumed run without the lines of steps after the
/// checkpoint's (the killed run logged them; the resumed run logs them again).
fn trim_log_after(log: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(log) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_none_or(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::fsutil::write_atomic(log, kept.as_bytes())?;
    Ok(())
}

/// The run's settings from the flags (a new run; a resumed one takes its checkpoint's).
fn config_from_flags(a: &TrainArgs) -> TrainConfig {
    TrainConfig {
        steps: a.steps,
        epoch_steps: a.epoch_steps,
        sampler: CropSampler {
            crop: a.crop,
            batch: a.batch,
            input_scale: a.input_scale,
            target_scale: a.target_scale,
            ..CropSampler::default()
        },
        schedule: LrSchedule {
            base: a.lr,
            decay_rate: a.lr_decay,
            decay_steps: a.lr_decay_steps,
        },
        grad_mode: a.grad_mode,
        seed: a.seed,
        precision: a.precision.unwrap_or_default(),
        ..TrainConfig::default()
    }
}

/// `train --fixed-norm`: from the --like raw volume, or given values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FixedNormArg {
    Like,
    Values(f64, f64),
}

fn parse_fixed_norm(s: &str) -> std::result::Result<FixedNormArg, String> {
    if s.trim() == "like" {
        return Ok(FixedNormArg::Like);
    }
    match parse_range(s)? {
        (lo, hi) if lo < hi => Ok(FixedNormArg::Values(lo, hi)),
        _ => Err(format!("{s:?}: give `like` or LO,HI with LO < HI")),
    }
}

/// `--like RAW`: estimates the raw volume's acquisition, sets the synthetic pairs' photon
/// level, read noise and density to match, prints it; returns the estimate and the settings.
fn like_raw(
    raw_path: &std::path::Path,
    psf_path: &std::path::Path,
    psf: &crate::imaging::Volume,
    sc: &mut SynthConfig,
) -> Result<(AcquisitionEstimate, serde_json::Value, crate::imaging::Volume)> {
    let raw = read_volume(raw_path).with_context(|| format!("reading {}", raw_path.display()))?;
    if let Some(note) = crate::imaging::psf::check_voxel_sizes_match(psf, &raw)
        .with_context(|| format!("PSF {} and raw volume {}", psf_path.display(), raw_path.display()))?
    {
        eprintln!("note: {note}");
    }
    let est = acquisition::estimate(&raw).with_context(|| format!("estimating the noise of {}", raw_path.display()))?;
    eprintln!("{}: {}", raw_path.display(), est.summary());
    let m = acquisition::match_synthetic(&est, raw.dims, psf, sc)
        .with_context(|| format!("matching synthetic pairs to {}", raw_path.display()))?;
    (sc.photons, sc.read_noise, sc.density) = (m.photons, m.read_noise, m.density);
    sc.background = m.background as f32;
    eprintln!(
        "  → synthetic pairs: {:.3} photons per unit, read noise {:.2}, density {:.3}, background {:.2} \
         (floor {:.1} units with this PSF's haze at density 1; matched on {} synthetic volumes of {})",
        m.photons,
        m.read_noise,
        m.density,
        m.background,
        m.background_units,
        m.probes,
        crate::imaging::volume::dims_str(m.probe_size)
    );
    let synth = serde_json::to_value(&m).map_err(|e| Error::invalid(format!("recording the match: {e}")))?;
    Ok((est, synth, raw))
}

/// The error of `--fixed-norm like` without `--like RAW` (checked early, and where the values are taken).
fn fixed_norm_like_without_like() -> Error {
    Error::invalid(
        "--fixed-norm like takes its values from the --like raw volume: give --like RAW, or give --fixed-norm LO,HI",
    )
}

/// The model's fixed normalization: from `--fixed-norm`, else the `--init` model's.
fn fixed_norm(
    a: &TrainArgs,
    config: &ModelConfig,
    like: Option<&(crate::imaging::Volume, AcquisitionEstimate)>,
) -> Result<Option<FixedNorm>> {
    let f = match a.fixed_norm {
        None => return Ok(config.norm_fixed),
        Some(FixedNormArg::Values(low, high)) => FixedNorm {
            low,
            high,
            camera_offset: 0.0,
            camera_gain: 1.0,
        },
        Some(FixedNormArg::Like) => {
            let (raw, est) = like.ok_or_else(fixed_norm_like_without_like)?;
            let [p_lo, p_hi] = config.norm_percentiles;
            let v = percentiles(&raw.data, &[p_lo, p_hi])?;
            FixedNorm {
                low: v[0],
                high: v[1],
                camera_offset: est.offset,
                camera_gain: est.gain,
            }
        }
    };
    f.validate().map_err(|e| {
        Error::invalid(format!(
            "--fixed-norm: {e} (a raw volume whose percentiles coincide cannot set the scale: give LO,HI)"
        ))
    })?;
    Ok(Some(f))
}

/// Runs `rln-engine train` with these options (progress on stderr); the model's
/// provenance records the process's command line. Returns what the run did, to print.
pub fn train(a: &TrainArgs) -> Result<TrainSummary> {
    train_as(a, &std::env::args().collect::<Vec<_>>().join(" "))
}

/// [`train`], recording `command_line` as the command that trained the model (the
/// bindings give the call that made it).
pub fn train_as(a: &TrainArgs, command_line: &str) -> Result<TrainSummary> {
    crate::fsutil::check_output_dir(&a.output)?;
    if a.resume.is_none() {
        config_from_flags(a).validate()?;
    }
    // before any data is made
    if a.fixed_norm == Some(FixedNormArg::Like) && a.like.is_none() && a.resume.is_none() {
        return Err(fixed_norm_like_without_like());
    }
    if a.synth_psf.is_some() && a.synth_count == 0 {
        return Err(Error::invalid(
            "--synth-count 0: give at least 1 synthetic training volume",
        ));
    }
    if a.input2.is_some() && a.variant == Variant::Single {
        return Err(Error::invalid(
            "--input2 gives a second view: choose --variant dual-average or dual-concat",
        ));
    }
    if a.variant != Variant::Single && a.synth_psf.is_some() {
        return Err(Error::invalid("synthetic data has one view: train dual-view models on registered view pairs (--data DIR with DIR/input2/ or --input2)"));
    }
    if a.precision == Some(TrainPrecision::Mixed) && a.device == Device::Cpu {
        return Err(Error::invalid(
            "--precision mixed is a CUDA option (bf16 tensor-core convolutions): train with --device cuda, \
             or with --precision fp32 on the CPU",
        ));
    }
    // the device first (every problem reported before data is made and training starts)
    let mut gpu = match a.device {
        Device::Cpu => None,
        Device::Cuda => Some(CudaTrainBackend::open(0).context("--device cuda")?),
        Device::Auto => {
            let b = if cuda::available() {
                CudaTrainBackend::open(0)
                    .map_err(|e| eprintln!("note: the CUDA device is not usable ({e}); training on the CPU"))
                    .ok()
            } else {
                eprintln!("note: no CUDA device; training on the CPU");
                None
            };
            b
        }
    };
    let device_name = gpu
        .as_ref()
        .map(|b| b.describe())
        .unwrap_or_else(|| format!("CPU, {} threads", crate::threads()));
    let ckpt_path = a
        .checkpoint
        .clone()
        .unwrap_or_else(|| sibling(&a.output, "ckpt.safetensors"));
    let log_path = a.log.clone().unwrap_or_else(|| sibling(&a.output, "log.jsonl"));
    let best_path = sibling(&a.output, "best.safetensors");
    let mut inputs: Vec<(&str, &Path)> = Vec::new();
    inputs.extend(a.init.as_deref().map(|p| ("the initial weights --init", p)));
    inputs.extend(a.synth_psf.as_deref().map(|p| ("the PSF --synth-psf", p)));
    // a resumed run writes its checkpoint where it read it: that one overwrite is the point
    if let Some(r) = a.resume.as_deref().filter(|r| !crate::fsutil::same_file(r, &ckpt_path)) {
        inputs.push(("the checkpoint --resume", r));
    }
    use crate::args::{Output, MODEL_EXTENSIONS};
    let _guard = crate::args::guard_outputs(
        &[
            Output {
                role: "the output -o",
                path: &a.output,
                extensions: MODEL_EXTENSIONS,
            },
            Output {
                role: "the checkpoint --checkpoint",
                path: &ckpt_path,
                extensions: MODEL_EXTENSIONS,
            },
            Output {
                role: "the log --log",
                path: &log_path,
                extensions: &[],
            },
            Output {
                role: "the best model (OUTPUT.best.safetensors)",
                path: &best_path,
                extensions: MODEL_EXTENSIONS,
            },
        ],
        &inputs,
    )?;
    if let Some(r) = &a.resume {
        if !r.exists() {
            return Err(Error::invalid(format!(
                "--resume {}: no such checkpoint (a run stopped before its first checkpoint leaves none): \
                 start the run again without --resume",
                r.display()
            )));
        }
    }

    // the run's config: from the checkpoint when resuming, else from the flags
    let resumed = match &a.resume {
        Some(p) => Some(trainer::load_checkpoint(p).with_context(|| format!("reading checkpoint {}", p.display()))?),
        None => None,
    };
    let mut psf_meta = None;
    let mut like_meta: Option<serde_json::Value> = None;
    // the --like raw volume and its camera, for --fixed-norm like
    let mut like_raw_volume: Option<(crate::imaging::Volume, AcquisitionEstimate)> = None;
    // data (every problem reported before training starts)
    let (data, val) = if let Some(psf_path) = &a.synth_psf {
        let psf = read_volume_with(
            psf_path,
            &ReadOptions {
                channel: a.channel,
                time: a.time,
                ..Default::default()
            },
        )
        .context("--synth-psf")?;
        psf_meta = psf
            .metadata
            .as_ref()
            .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok());
        let mut sc = synth_config(a);
        if let Some(raw_path) = &a.like {
            let (est, synth, raw) = like_raw(raw_path, psf_path, &psf, &mut sc)?;
            like_meta =
                Some(serde_json::json!({"raw": raw_path.display().to_string(), "estimate": est, "synthetic": synth}));
            like_raw_volume = Some((raw, est));
        }
        eprintln!(
            "making {} training and {} validation volumes of {:?} for {} ...",
            a.synth_count,
            a.synth_val_count,
            sc.size,
            psf_path.display()
        );
        let vary = SynthVariation {
            density: (a.synth_density != (1.0, 1.0)).then_some(a.synth_density),
            photons: (a.photons.0 != a.photons.1).then_some(a.photons),
            family_subsets: a.synth_family_subsets,
        };
        let data = Dataset::synthetic(&sc, &psf, a.synth_count, a.seed, &vary)?;
        let val = match &a.val {
            Some(v) => Some(Dataset::from_dir(v, None)?),
            None if a.synth_val_count > 0 => Some(Dataset::synthetic(
                &sc,
                &psf,
                a.synth_val_count,
                a.seed.wrapping_add(1 << 40),
                &vary,
            )?),
            None => None,
        };
        (data, val)
    } else {
        let dir = a.data.as_ref().expect("clap requires --data");
        let dual = a.variant != Variant::Single;
        let input2 = a.input2.clone().or_else(|| dual.then(|| dir.join("input2")));
        let data =
            Dataset::from_dir(dir, input2.as_deref()).with_context(|| format!("training data in {}", dir.display()))?;
        let val = match &a.val {
            Some(v) => Some(
                Dataset::from_dir(v, dual.then(|| v.join("input2")).as_deref())
                    .with_context(|| format!("validation data in {}", v.display()))?,
            ),
            None => None,
        };
        (data, val)
    };

    let (mut state, mut cfg) = match resumed {
        Some((state, cfg, fp)) => {
            if fp != data.fingerprint() {
                return Err(Error::invalid(format!("the checkpoint was written for other training data ({} pairs); resume with the same --data / --synth-psf flags", fp.len())));
            }
            (state, cfg)
        }
        None => {
            let cfg = config_from_flags(a);
            let mconf = ModelConfig {
                variant: a.variant,
                div_eps: a.div_eps,
                psf: psf_meta.clone(),
                norm_percentiles: a
                    .percentiles
                    .map_or(ModelConfig::default().norm_percentiles, |(l, h)| [l, h]),
                ..ModelConfig::default()
            };
            mconf.validate()?;
            let model = match &a.init {
                // fine-tuning: the given weights and their network config; the PSF record
                // follows the new training data
                Some(p) => {
                    let mut m = Model::<f32>::load(p).context("--init")?;
                    if m.config.variant != a.variant {
                        return Err(Error::invalid(format!(
                            "--init {} is a {:?} model but --variant is {:?}",
                            p.display(),
                            m.config.variant,
                            a.variant
                        )));
                    }
                    if psf_meta.is_some() {
                        m.config.psf = psf_meta.clone();
                    }
                    if a.percentiles.is_some() {
                        m.config.norm_percentiles = mconf.norm_percentiles;
                    }
                    m
                }
                None => Model::<f32>::init(mconf, a.seed),
            };
            let mut model = model;
            model.config.norm_fixed = fixed_norm(a, &model.config, like_raw_volume.as_ref())?;
            // crops are normalized as the model will normalize at inference (synthetic
            // inputs are in photons: the fixed values go back through the camera)
            let mut cfg = cfg;
            cfg.sampler.percentiles = model.config.norm_percentiles;
            cfg.sampler.fixed = model
                .config
                .norm_fixed
                .map(|f| if a.synth_psf.is_some() { f.in_photons() } else { f });
            if let Some(f) = &model.config.norm_fixed {
                let p = cfg.sampler.fixed.expect("set above");
                eprintln!(
                    "input normalization: fixed, raw {:.4}..{:.4} → 0..1 (camera offset {:.3}, gain {:.4}; training inputs {:.4}..{:.4})",
                    f.low, f.high, f.camera_offset, f.camera_gain, p.low, p.high
                );
            }
            let state = TrainState::new(model, &cfg);
            (state, cfg)
        }
    };
    cfg.steps = a.steps.max(state.step);
    if let Some(p) = a.precision.filter(|&p| p != cfg.precision) {
        eprintln!(
            "note: the checkpoint trained with --precision {}; continuing with --precision {p}",
            cfg.precision
        );
        cfg.precision = p;
    }
    match gpu.as_mut() {
        Some(b) => b.set_precision(cfg.precision),
        None if cfg.precision == TrainPrecision::Mixed => {
            return Err(Error::invalid(if a.resume.is_some() {
                "the checkpoint trained with --precision mixed, a CUDA option, and no CUDA device is used: \
                 resume with --device cuda, or with --precision fp32 on the CPU"
            } else {
                "--precision mixed is a CUDA option and no CUDA device is used: train with --device cuda, \
                 or with --precision fp32 on the CPU"
            }));
        }
        None => {}
    }
    data.check_crop(cfg.sampler.crop)?;

    // a fresh run starts a fresh log; a resumed one continues it from the checkpoint's step
    if a.resume.is_some() {
        trim_log_after(&log_path, state.step)?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(a.resume.is_some())
        .truncate(a.resume.is_none())
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e).context("opening the log"))?;
    let bar = ProgressBar::with_draw_target(Some(cfg.steps), ProgressDrawTarget::hidden());
    if std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
    }
    bar.set_style(
        ProgressStyle::with_template("train [{bar:30}] {pos}/{len} steps {msg} ({elapsed}, eta {eta})")
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_position(state.step);
    let start = Instant::now();
    let first = state.step;
    eprintln!(
        "training {} steps (from step {first}) on {} pairs, batch {}×{:?}, on {device_name} ({}); checkpoint {}",
        cfg.steps,
        data.pairs.len(),
        cfg.sampler.batch,
        cfg.sampler.crop,
        cfg.precision,
        ckpt_path.display()
    );
    let provenance = if a.reproducible {
        format!(
            "trained by rln-engine {} (--reproducible: command line and timings left out)",
            env!("CARGO_PKG_VERSION")
        )
    } else {
        format!("trained by rln-engine {} ({command_line})", env!("CARGO_PKG_VERSION"))
    };
    let mut obs = CliObserver {
        bar,
        log,
        start,
        ckpt: ckpt_path.clone(),
        data_fp: data.fingerprint(),
        last_val: None,
        best_path,
        best: None,
        provenance: provenance.clone(),
        keep_models_of: a.keep_checkpoints.then(|| a.output.clone()),
    };
    let every = a.checkpoint_every.unwrap_or(cfg.epoch_steps);
    let result = match &gpu {
        Some(b) => trainer::train_on(
            b,
            true,
            &mut state,
            &cfg,
            &data,
            val.as_ref(),
            every,
            a.stop_after,
            &mut obs,
        ),
        None => trainer::train_on(
            &CpuBackend::<f32>::new(),
            false,
            &mut state,
            &cfg,
            &data,
            val.as_ref(),
            every,
            a.stop_after,
            &mut obs,
        ),
    };
    obs.bar.finish_and_clear();
    let last_val = match result {
        Ok(v) => v,
        // the variant stays (out of memory is still out of memory), with where to go on
        Err(e) => {
            let e = match &gpu {
                Some(_) if e.is_out_of_memory() => e.note("or train on the CPU (--device cpu), in host memory"),
                _ => e,
            };
            return Err(e.note(format_args!(
                "the last good checkpoint is {} (continue with --resume)",
                ckpt_path.display()
            )));
        }
    };
    if state.step < cfg.steps {
        return Ok(TrainSummary::Stopped {
            step: state.step,
            steps: cfg.steps,
            checkpoint: ckpt_path,
        });
    }
    let secs = start.elapsed().as_secs_f64();
    let mut model = state.model.clone();
    model.config.provenance = provenance;
    let mut training = serde_json::json!({
        "steps": cfg.steps, "batch": cfg.sampler.batch, "crop": cfg.sampler.crop, "grad_mode": cfg.grad_mode,
        "precision": cfg.precision,
        "schedule": cfg.schedule, "seed": cfg.seed, "pairs": data.pairs.len(),
        "device": if a.reproducible && gpu.is_none() { "CPU".to_string() } else { device_name.clone() },
        "percentiles": cfg.sampler.percentiles, "input_scale": cfg.sampler.input_scale,
        "fixed_norm": cfg.sampler.fixed,
        "validation": last_val,
        "like": like_meta,
    });
    if !a.reproducible {
        // volatile: differs between identical runs and between a resumed and a straight run
        training["threads"] = crate::threads().into();
        training["wall_s_this_run"] = secs.into();
        training["steps_this_run"] = (cfg.steps - first).into();
    }
    model.config.training = Some(training);
    model.save(&a.output)?;
    Ok(TrainSummary::Finished {
        output: a.output.clone(),
        steps: cfg.steps,
        steps_this_run: cfg.steps - first,
        seconds: secs,
        validation: last_val,
        best: obs.best.map(|(step, m)| (step, m, obs.best_path)),
    })
}

/// What a `train` run did, for the caller to print ([`std::fmt::Display`]: the CLI's
/// closing lines).
#[derive(Clone, Debug, PartialEq)]
pub enum TrainSummary {
    /// Every step ran and the model was written.
    Finished {
        output: PathBuf,
        steps: u64,
        steps_this_run: u64,
        seconds: f64,
        /// The last validation's metrics (with validation data).
        validation: Option<ValMetrics>,
        /// The step with the lowest validation loss, its metrics and where that model is.
        best: Option<(u64, ValMetrics, PathBuf)>,
    },
    /// `--stop-after` stopped the run early; the checkpoint continues it.
    Stopped { step: u64, steps: u64, checkpoint: PathBuf },
}

impl std::fmt::Display for TrainSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrainSummary::Stopped {
                step,
                steps,
                checkpoint,
            } => write!(
                f,
                "stopped after step {step} of {steps}; continue with --resume {}",
                checkpoint.display()
            ),
            TrainSummary::Finished {
                output,
                steps,
                steps_this_run,
                seconds,
                validation,
                best,
            } => {
                write!(
                    f,
                    "wrote {} after {steps} steps ({seconds:.1} s for {steps_this_run} steps this run{})",
                    output.display(),
                    validation
                        .as_ref()
                        .map(|v| format!("; validation PSNR {:.2} dB, SSIM {:.4}", v.psnr, v.ssim))
                        .unwrap_or_default()
                )?;
                if let Some((step, m, path)) = best {
                    write!(
                        f,
                        "\nlowest validation loss at step {step} (PSNR {:.2} dB, SSIM {:.4}): {}",
                        m.psnr,
                        m.ssim,
                        path.display()
                    )?;
                }
                Ok(())
            }
        }
    }
}
