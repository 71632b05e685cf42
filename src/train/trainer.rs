//! The training loop: the authors' recipe (rln-spec.md §5–6) with every part
//! overridable, validation, atomic checkpoints and exact resume.

use super::adam::{Adam, LrSchedule};
use super::data::{normalize_views, CropSampler, Dataset};
use crate::backend::cpu::CpuBackend;
use crate::backend::loss::{loss_terms, LossTerms};
use crate::backend::{Backend, GradMode, TrainPrecision};
use crate::error::{Error, Result};
use crate::imaging::metrics::{evaluate, Normalize};
use crate::imaging::volume::Volume;
use crate::model::tensor_file::TensorFile;
use crate::model::{Model, Params};
use crate::net::{BnMode, Rln};
use crate::tensor::{Shape, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Everything that defines a training run besides the data and the initial weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Total optimizer steps (the authors': 10 000 = 100 epochs × 100 steps).
    pub steps: u64,
    /// Steps per epoch: validation runs after each.
    pub epoch_steps: u64,
    pub sampler: CropSampler,
    pub schedule: LrSchedule,
    pub grad_mode: GradMode,
    pub seed: u64,
    /// Validation volumes larger than this are center-cropped to it (z, y, x).
    pub val_crop: [usize; 3],
    /// Arithmetic of the convs (`--precision`; mixed is CUDA's). Checkpoints before it
    /// existed read as FP32.
    #[serde(default)]
    pub precision: TrainPrecision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 10_000,
            epoch_steps: 100,
            sampler: CropSampler::default(),
            schedule: LrSchedule::default(),
            grad_mode: GradMode::Paper,
            seed: 0,
            val_crop: [64, 128, 128],
            precision: TrainPrecision::Fp32,
        }
    }
}

/// Smallest crop edge trained on: below it the half-resolution branch sees one or two
/// voxels per axis and batch statistics of such crops are meaningless.
pub const MIN_CROP: usize = 4;

impl TrainConfig {
    /// Errors on settings that cannot train (checked before any data is made): an empty
    /// batch or epoch, crops below [`MIN_CROP`], a learning rate or decay that is not a
    /// finite positive number.
    pub fn validate(&self) -> Result<()> {
        let s = &self.sampler;
        if s.batch == 0 {
            return Err(Error::invalid("--batch 0: a batch needs at least 1 crop"));
        }
        if self.epoch_steps == 0 {
            return Err(Error::invalid("--epoch-steps 0: an epoch needs at least 1 step"));
        }
        if s.crop.iter().any(|&c| c < MIN_CROP) {
            return Err(Error::invalid(format!(
                "--crop {:?} is too small: every edge must be at least {MIN_CROP} voxels (the authors': 64)",
                s.crop
            )));
        }
        let lr = &self.schedule;
        if !(lr.base.is_finite() && lr.base > 0.0) {
            return Err(Error::invalid(format!(
                "--lr {} must be a finite positive number (the authors': 0.015)",
                lr.base
            )));
        }
        if !(lr.decay_rate.is_finite() && lr.decay_rate > 0.0 && lr.decay_rate <= 1.0) {
            return Err(Error::invalid(format!(
                "--lr-decay {} must lie in (0, 1] (the authors': 0.95)",
                lr.decay_rate
            )));
        }
        if !(lr.decay_steps.is_finite() && lr.decay_steps > 0.0) {
            return Err(Error::invalid(format!(
                "--lr-decay-steps {} must be a finite positive number (the authors': 600)",
                lr.decay_steps
            )));
        }
        if let Some((lo, hi)) = s.input_scale {
            if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi) {
                return Err(Error::invalid(format!(
                    "--input-scale {lo},{hi} must satisfy 0 < LOW ≤ HIGH (finite)"
                )));
            }
        }
        Ok(())
    }
}

/// Model, optimizer and position of a run: what a checkpoint holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    pub model: Model<f32>,
    pub adam: Adam,
    /// Steps completed.
    pub step: u64,
}

impl TrainState {
    pub fn new(model: Model<f32>, cfg: &TrainConfig) -> Self {
        let adam = Adam::new(model.config.variant, cfg.schedule);
        TrainState { model, adam, step: 0 }
    }
}

/// Validation metrics averaged over the held-out pairs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ValMetrics {
    pub loss: f64,
    pub psnr: f64,
    pub ssim: f64,
    pub pairs: usize,
}

/// What the loop reports; the CLI turns it into a progress bar, a log and checkpoints.
pub trait TrainObserver {
    fn on_step(&mut self, _step: u64, _terms: &LossTerms, _lr: f64) {}
    /// After each validation, with the model it scored.
    fn on_validation(&mut self, _step: u64, _m: &ValMetrics, _model: &Model<f32>) -> Result<()> {
        Ok(())
    }
    /// Called every `checkpoint_every` steps and at the end, with the state to save.
    fn on_checkpoint(&mut self, _state: &TrainState, _cfg: &TrainConfig) -> Result<()> {
        Ok(())
    }
}

/// One optimizer step on `batch`: forward with batch statistics, loss, backward,
/// Adam, the running-statistics update. Fails (without touching `state`) on a
/// non-finite loss or gradient. On the CPU; [`train_step_on`] takes any backend.
pub fn train_step(state: &mut TrainState, cfg: &TrainConfig, x: &Tensor<f32>, g: &Tensor<f32>) -> Result<LossTerms> {
    train_step_on(&CpuBackend::<f32>::new(), state, cfg, x, g)
}

/// [`train_step`] on backend `b`: the state is copied to the backend's resident
/// optimizer state ([`Backend::opt_new`]), one step runs there, and Adam's moments come
/// back. A loop keeps the resident state across steps instead ([`train_on`]). A
/// backend's error is returned with `state` untouched; running out of memory is an
/// [`Error::OutOfMemory`] that says which settings to lower.
pub fn train_step_on<B: Backend<T = f32>>(
    b: &B,
    state: &mut TrainState,
    cfg: &TrainConfig,
    x: &Tensor<f32>,
    g: &Tensor<f32>,
) -> Result<LossTerms> {
    let step = state.step;
    let mut opt = b.opt_new(&state.model, &state.adam).map_err(|e| {
        step_error(
            e,
            &format!("training step {step} (optimizer state)"),
            x.shape,
            &advice(x.shape),
        )
    })?;
    let r = train_step_resident(b, &mut opt, state, cfg, x, g);
    if state.step != step || matches!(r, Err(Error::Numeric(_))) {
        // the resident state moved (a completed step, or weights that became non-finite)
        state.adam = b.opt_download(&opt, &mut state.model)?;
    }
    r
}

/// On a backend that queues steps ([`Backend::opt_step_queued`]), the loop reads the loss
/// and the steps' outcome (one synchronization) every this many steps, and before every
/// validation and checkpoint.
pub const POLL_EVERY: u64 = 10;

/// One step on the resident state `opt` of backend `b`, whose host mirror is
/// `state.model` (`state.adam` is not read or written): the batch is copied to the
/// backend; forward, loss, backward, Adam and the running statistics run there
/// ([`Rln::resident`], [`Rln::backward_into`], [`Backend::opt_step_queued`]); the loss
/// terms come back. Fails (state untouched) on a non-finite loss or gradient.
pub fn train_step_resident<B: Backend<T = f32>>(
    b: &B,
    opt: &mut B::Opt,
    state: &mut TrainState,
    cfg: &TrainConfig,
    x: &Tensor<f32>,
    g: &Tensor<f32>,
) -> Result<LossTerms> {
    match train_step_queued(b, opt, state, cfg, x, g)? {
        Some(t) => Ok(t),
        None => {
            poll_steps(b, opt, state)?.ok_or_else(|| Error::invalid("the backend kept no loss of the step it queued"))
        }
    }
}

/// Queues one step (see [`train_step_resident`]): its loss where the step is done at once
/// (`state` up to date), or None where the backend queued it: then nothing came back to
/// the host (on a device: no copy to the host, no synchronization) and `state.model` is
/// not updated until [`poll_steps`]; `state.step` counts the step either way.
pub fn train_step_queued<B: Backend<T = f32>>(
    b: &B,
    opt: &mut B::Opt,
    state: &mut TrainState,
    cfg: &TrainConfig,
    x: &Tensor<f32>,
    g: &Tensor<f32>,
) -> Result<Option<LossTerms>> {
    let step = state.step;
    let upload = || -> Result<_> { Ok((b.from_host(x)?, b.from_host(g)?)) };
    let (xd, gd) = upload().map_err(|e| step_error(e, &format!("training step {step}"), x.shape, &advice(x.shape)))?;
    let (terms, updated) = device_step(b, opt, state, cfg, &xd, &gd)?;
    step_outcome(state, step, terms, updated)
}

/// The backend's part of a step on the batch `xd`, `gd` already on the backend: forward,
/// loss, backward, and the optimizer step queued ([`Backend::opt_step_queued`]'s answer:
/// None where queued). Where the backend queues, this is device work only: what a graph
/// records. A non-finite loss known at once skips the optimizer (answer Some(false)).
fn device_step<B: Backend<T = f32>>(
    b: &B,
    opt: &mut B::Opt,
    state: &mut TrainState,
    cfg: &TrainConfig,
    xd: &B::X,
    gd: &B::X,
) -> Result<(Option<LossTerms>, Option<bool>)> {
    let step = state.step;
    let shape = b.shape(xd);
    let run = |opt: &B::Opt| -> Result<_> {
        let net = Rln::resident(b, &state.model, opt);
        let fwd = net.forward(xd, BnMode::Batch, true)?;
        let x1_own;
        let x1 = if shape.c > 1 {
            x1_own = b.channel_mean(xd)?;
            &x1_own
        } else {
            xd
        };
        let (terms, dy, de1r) = b.loss_resident(&fwd.prediction, &fwd.e1_raw, x1, gd, opt)?;
        let mut grads = b.grads_new(state.model.config.variant)?;
        net.backward_into(&fwd, &dy, &de1r, cfg.grad_mode, &mut grads)?;
        Ok((terms, grads, fwd.batch_stats))
    };
    let (terms, grads, stats) =
        run(opt).map_err(|e| step_error(e, &format!("training step {step}"), shape, &advice(shape)))?;
    if terms.is_some_and(|t| !t.loss.is_finite()) {
        return Ok((terms, Some(false)));
    }
    let updated = b
        .opt_step_queued(opt, &grads, &stats, &mut state.model)
        .map_err(|e| step_error(e, &format!("training step {step} (optimizer)"), shape, &advice(shape)))?;
    Ok((terms, updated))
}

/// What a step's answers mean for `state`: an error for a non-finite loss or gradient
/// known at once, the loss of a finished step, or None for a queued one (counted in
/// `state.step` either way).
fn step_outcome(
    state: &mut TrainState,
    step: u64,
    terms: Option<LossTerms>,
    updated: Option<bool>,
) -> Result<Option<LossTerms>> {
    if let Some(t) = terms.filter(|t| !t.loss.is_finite()) {
        return Err(Error::Numeric(format!(
            "step {step}: the loss is {} (mse {}, ssim {}): training diverged or the data holds bad values",
            t.loss, t.mse, t.ssim
        )));
    }
    match (updated, terms) {
        (Some(false), t) => Err(Error::Numeric(format!(
            "step {step}: a gradient is not finite although the loss is {}",
            t.map_or(f64::NAN, |t| t.loss)
        ))),
        (Some(true), Some(t)) => {
            if !state.model.params.all_finite() {
                return Err(Error::Numeric(format!("step {step}: the weights became non-finite")));
            }
            state.step += 1;
            Ok(Some(t))
        }
        _ => {
            state.step += 1;
            Ok(None)
        }
    }
}

/// The loop's step recorded as graphs on a backend that records them
/// ([`Backend::capture_begin`]): two fixed batch buffers, each with its own graph (the
/// batch of the next step is uploaded into the other buffer while a step runs; the
/// upload is ordered before that step's replay), recorded at their first use.
struct CapturedSteps<B: Backend> {
    buffers: Vec<(B::X, B::X)>,
    graphs: Vec<Option<Box<dyn crate::backend::StepReplay>>>,
    /// The buffer (and graph) of the next step: the two alternate.
    next: usize,
}

impl<B: Backend<T = f32>> CapturedSteps<B> {
    /// Runs step `state.step` on `x`, `g` as a replay (recording its graph first when
    /// this buffer has none yet). Only for backends that queue steps.
    fn step(
        &mut self,
        b: &B,
        opt: &mut B::Opt,
        state: &mut TrainState,
        cfg: &TrainConfig,
        x: &Tensor<f32>,
        g: &Tensor<f32>,
    ) -> Result<()> {
        let k = self.next;
        self.next = 1 - k;
        if self.buffers.len() <= k {
            self.buffers.push((b.from_host(x)?, b.from_host(g)?));
            self.graphs.push(None);
        } else {
            // asynchronous where the backend can (CUDA: pinned memory, copy stream), after
            // the step that last read this buffer
            let (xb, gb) = &mut self.buffers[k];
            b.write_host_staged(2 * k, xb, x)?;
            b.write_host_staged(2 * k + 1, gb, g)?;
        }
        b.opt_prepare(opt)?;
        match &self.graphs[k] {
            Some(graph) => {
                graph.replay()?;
                b.opt_advance(opt);
            }
            None => {
                if !b.capture_begin()? {
                    return Err(Error::invalid("the backend records no graphs"));
                }
                let (xb, gb) = &self.buffers[k];
                let r = device_step(b, opt, state, cfg, xb, gb);
                let graph = b.capture_end();
                let (terms, updated) = r?;
                let graph = graph?;
                if updated.is_some() || terms.is_some() {
                    return Err(Error::invalid(
                        "a recorded step must be queued on the backend, with nothing for the host",
                    ));
                }
                graph.replay()?;
                self.graphs[k] = Some(graph);
            }
        }
        b.staged_read(2 * k)?;
        b.staged_read(2 * k + 1)?;
        state.step += 1;
        Ok(())
    }
}

/// The outcome of the steps queued since the last poll: `state.model` brought up to
/// date, and the last step's loss where the backend kept it. A failed step is an error,
/// with `state.step` set back to it (the backend's state is that before it).
pub fn poll_steps<B: Backend<T = f32>>(b: &B, opt: &mut B::Opt, state: &mut TrainState) -> Result<Option<LossTerms>> {
    let (failed, loss) = b.opt_poll(opt, &mut state.model)?;
    if let Some(k) = failed {
        state.step = k;
        return Err(Error::Numeric(format!(
            "step {k}: the loss or a gradient is not finite (training diverged or the data holds bad values); \
             the state is that before step {k}"
        )));
    }
    if !state.model.params.all_finite() {
        return Err(Error::Numeric(format!(
            "by step {}: the weights became non-finite",
            state.step
        )));
    }
    Ok(loss)
}

/// What to lower when a training step on a batch of `shape` does not fit.
fn advice(shape: Shape) -> String {
    format!(
        "lower the batch size (--batch, now {}) or the crop size (--crop, now {}×{}×{})",
        shape.n, shape.d, shape.h, shape.w
    )
}

/// A backend's error during `what` on an input of `shape`, with what to do about it: out
/// of memory names the settings to lower (the variant stays, so callers can tell).
fn step_error(e: Error, what: &str, shape: Shape, advice: &str) -> Error {
    match e {
        Error::OutOfMemory(msg) => Error::OutOfMemory(format!("{what} on {shape}: {msg}; {advice}")),
        Error::Cuda(msg) => Error::Cuda(format!("{what}: {msg}")),
        e => e,
    }
}

/// Center crop of at most `max` voxels per axis.
fn center_crop(v: &Volume, max: [usize; 3]) -> Result<Volume> {
    let d = v.dims;
    let c = [d[0].min(max[0]), d[1].min(max[1]), d[2].min(max[2])];
    if c == d {
        return Ok(v.clone());
    }
    v.crop([(d[0] - c[0]) / 2, (d[1] - c[1]) / 2, (d[2] - c[2]) / 2], c)
}

/// Loss, PSNR and SSIM of `model` on `val` (inference mode, running statistics).
pub fn validate(model: &Model<f32>, val: &Dataset, cfg: &TrainConfig) -> Result<ValMetrics> {
    validate_on(&CpuBackend::<f32>::new(), model, val, cfg)
}

/// [`validate`] with the network on backend `b`.
pub fn validate_on<B: Backend<T = f32>>(
    b: &B,
    model: &Model<f32>,
    val: &Dataset,
    cfg: &TrainConfig,
) -> Result<ValMetrics> {
    let net = Rln::new(b, model);
    let mut m = ValMetrics::default();
    for p in &val.pairs {
        let gt = center_crop(&p.ground_truth, cfg.val_crop)?;
        let crops = p
            .inputs
            .iter()
            .map(|v| Ok(center_crop(v, cfg.val_crop)?.data))
            .collect::<Result<_>>()?;
        let (views, affines) = normalize_views(crops, cfg.sampler.percentiles, cfg.sampler.fixed.as_ref())?;
        let d = gt.dims;
        let shape = Shape::new(1, 1, d[0], d[1], d[2]);
        let x1 = Tensor::from_vec(
            shape,
            if views.len() == 2 {
                views[0].iter().zip(&views[1]).map(|(a, b)| 0.5 * (a + b)).collect()
            } else {
                views[0].clone()
            },
        )?;
        let x = match model.config.variant {
            crate::model::Variant::DualConcat => Tensor::from_vec(shape.with_c(2), views.concat())?,
            _ => x1.clone(),
        };
        let g = Tensor::from_vec(shape, cfg.sampler.target_scale.target(&gt.data, p, &affines)?)?;
        let run = || -> Result<_> {
            let fwd = net.forward(&b.from_host(&x)?, BnMode::Running, false)?;
            Ok((b.to_host(&fwd.prediction)?, b.to_host(&fwd.e1_raw)?))
        };
        let (prediction, e1_raw) = run().map_err(|e| {
            let advice = "the validation volume does not fit: validate on smaller volumes (--val), or on none";
            step_error(e, "validation", x.shape, advice)
        })?;
        m.loss += loss_terms(&prediction.data, &e1_raw.data, &x1.data, &g.data).loss;
        let pred = gt.like(prediction.data)?;
        let e = evaluate(&gt, &pred, Normalize::Affine, None)?;
        m.psnr += e.psnr;
        m.ssim += e.ssim;
        m.pairs += 1;
    }
    if m.pairs > 0 {
        let n = m.pairs as f64;
        m.loss /= n;
        m.psnr /= n;
        m.ssim /= n;
    }
    Ok(m)
}

/// Runs `cfg.steps − state.step` steps (or until `stop_after` total steps), validating
/// every epoch and checkpointing every `checkpoint_every` steps and at the end.
pub fn train(
    state: &mut TrainState,
    cfg: &TrainConfig,
    data: &Dataset,
    val: Option<&Dataset>,
    checkpoint_every: u64,
    stop_after: Option<u64>,
    obs: &mut dyn TrainObserver,
) -> Result<Option<ValMetrics>> {
    let b = CpuBackend::<f32>::new();
    train_on(&b, false, state, cfg, data, val, checkpoint_every, stop_after, obs)
}

/// [`train`] on backend `b`. With `prefetch`, the next batches are cut and normalized on
/// up to four host threads while the backend runs the current step (for a device: one
/// batch of 4 × 64³ takes ~11 ms on one core, longer than a GPU step; the CPU backend
/// needs its threads itself). Batches depend only on (step, seed), so the run is the same
/// either way, and a checkpoint of one backend resumes on the other.
#[allow(clippy::too_many_arguments)]
pub fn train_on<B: Backend<T = f32>>(
    b: &B,
    prefetch: bool,
    state: &mut TrainState,
    cfg: &TrainConfig,
    data: &Dataset,
    val: Option<&Dataset>,
    checkpoint_every: u64,
    stop_after: Option<u64>,
    obs: &mut dyn TrainObserver,
) -> Result<Option<ValMetrics>> {
    cfg.validate()?;
    data.check_crop(cfg.sampler.crop)?;
    let end = stop_after.map_or(cfg.steps, |s| s.min(cfg.steps));
    let variant = state.model.config.variant;
    let first = state.step;
    std::thread::scope(|scope| {
        // batches for steps first..end on `workers` threads (step first + k on worker
        // k mod workers), each at most one batch ahead; received in step order
        let workers = if prefetch {
            std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4)
        } else {
            0
        };
        let rx: Vec<std::sync::mpsc::Receiver<Result<super::data::Batch>>> = (0..workers)
            .map(|w| {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                scope.spawn(move || {
                    let mut step = first + w as u64;
                    while step < end {
                        if tx.send(cfg.sampler.batch(data, variant, step, cfg.seed)).is_err() {
                            break; // the loop stopped
                        }
                        step += workers as u64;
                    }
                });
                rx
            })
            .collect();
        let mut last_val = None;
        // weights, moments and statistics stay on the backend for the whole loop;
        // `state.model` mirrors them, `state.adam` is brought up to date for every
        // checkpoint and when the loop ends (also on an error)
        let mut opt = b.opt_new(&state.model, &state.adam).map_err(|e| {
            let s = &cfg.sampler;
            let shape = Shape::new(s.batch, variant.input_channels(), s.crop[0], s.crop[1], s.crop[2]);
            step_error(e, "the optimizer state", shape, &advice(shape))
        })?;
        let r = run_steps(
            b,
            &mut opt,
            state,
            cfg,
            val,
            checkpoint_every,
            end,
            obs,
            &mut last_val,
            |step| {
                if workers > 0 {
                    rx[((step - first) % workers as u64) as usize]
                        .recv()
                        .map_err(|_| Error::invalid("a batch thread stopped unexpectedly"))?
                } else {
                    cfg.sampler.batch(data, variant, step, cfg.seed)
                }
            },
        );
        let synced = b.opt_download(&opt, &mut state.model).map(|adam| state.adam = adam);
        r?;
        synced?;
        Ok(last_val)
    })
}

/// The steps of [`train_on`] from `state.step` to `end` on the resident state `opt`,
/// with validation and checkpoints; `batch(step)` gives a step's batch.
#[allow(clippy::too_many_arguments)]
fn run_steps<B: Backend<T = f32>>(
    b: &B,
    opt: &mut B::Opt,
    state: &mut TrainState,
    cfg: &TrainConfig,
    val: Option<&Dataset>,
    checkpoint_every: u64,
    end: u64,
    obs: &mut dyn TrainObserver,
    last_val: &mut Option<ValMetrics>,
    mut batch: impl FnMut(u64) -> Result<super::data::Batch>,
) -> Result<()> {
    // steps queued on the backend whose outcome the host has not read yet
    let mut pending = false;
    // after one step op by op (which makes what the step keeps, e.g. the packed-weight
    // tables), a backend that queues steps and records graphs replays them
    let mut captured: Option<CapturedSteps<B>> = None;
    while state.step < end {
        let batch = batch(state.step)?;
        let lr = state.adam.schedule.lr(state.step);
        if let Some(c) = captured.as_mut() {
            c.step(b, opt, state, cfg, &batch.input, &batch.ground_truth)?;
        } else {
            match train_step_queued(b, opt, state, cfg, &batch.input, &batch.ground_truth)? {
                Some(terms) => obs.on_step(state.step, &terms, lr),
                None => {
                    pending = true;
                    if b.records_graphs() {
                        captured = Some(CapturedSteps {
                            buffers: vec![],
                            graphs: vec![],
                            next: 0,
                        });
                    }
                }
            }
        }
        pending |= captured.is_some();
        let validate_now = val.is_some() && (state.step.is_multiple_of(cfg.epoch_steps) || state.step == cfg.steps);
        let checkpoint_now = (checkpoint_every > 0 && state.step.is_multiple_of(checkpoint_every)) || state.step == end;
        if pending && (state.step.is_multiple_of(POLL_EVERY) || validate_now || checkpoint_now) {
            pending = false;
            if let Some(terms) = poll_steps(b, opt, state)? {
                obs.on_step(state.step, &terms, lr);
            }
        }
        if let (Some(v), true) = (val, validate_now) {
            let m = validate_on(b, &state.model, v, cfg)?;
            obs.on_validation(state.step, &m, &state.model)?;
            *last_val = Some(m);
        }
        if checkpoint_now {
            state.adam = b.opt_download(opt, &mut state.model)?;
            obs.on_checkpoint(state, cfg)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- checkpoints

const CKPT_KEY: &str = "rln_checkpoint";
const ADAM_M: &str = "adam.m.";
const ADAM_V: &str = "adam.v.";

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    step: u64,
    adam_step: u64,
    config: TrainConfig,
    data: Vec<(String, [usize; 3])>,
}

/// Writes a checkpoint atomically: the model (loadable as a model file) plus Adam's
/// moments and the run's position and config in the metadata.
/// `data` is the training data's [`Dataset::fingerprint`].
pub fn save_checkpoint(
    path: &Path,
    state: &TrainState,
    cfg: &TrainConfig,
    data: &[(String, [usize; 3])],
) -> Result<()> {
    let mut w = state.model.to_writer();
    for (l, k) in state.adam.m.ids() {
        let name = Params::<f64>::name(l, k);
        let n = state.adam.m.tensor(l, k).len();
        w.add_f64(&format!("{ADAM_M}{name}"), vec![n], state.adam.m.tensor(l, k));
        w.add_f64(&format!("{ADAM_V}{name}"), vec![n], state.adam.v.tensor(l, k));
    }
    let meta = CheckpointMeta {
        step: state.step,
        adam_step: state.adam.step,
        config: cfg.clone(),
        data: data.to_vec(),
    };
    w.metadata
        .insert(CKPT_KEY.into(), serde_json::to_string(&meta).expect("serializes"));
    w.write(path)
}

/// Reads a checkpoint: the state and the config of the run that wrote it.
pub fn load_checkpoint(path: &Path) -> Result<(TrainState, TrainConfig, Vec<(String, [usize; 3])>)> {
    let file = TensorFile::open(path)?;
    let meta: CheckpointMeta = file
        .metadata()
        .get(CKPT_KEY)
        .ok_or_else(|| {
            Error::format(
                path,
                "not a training checkpoint (no rln_checkpoint metadata); --resume takes a file written during training",
            )
        })
        .and_then(|s| {
            serde_json::from_str(s).map_err(|e| Error::format(path, format!("checkpoint metadata is invalid: {e}")))
        })?;
    let model = Model::<f32>::from_file(&file, &[ADAM_M, ADAM_V])?;
    let mut adam = Adam::new(model.config.variant, meta.config.schedule);
    adam.step = meta.adam_step;
    for (l, k) in adam.m.ids() {
        let name = Params::<f64>::name(l, k);
        let n = adam.m.tensor(l, k).len();
        *adam.m.tensor_mut(l, k) = file.get_len(&format!("{ADAM_M}{name}"), n)?.data;
        *adam.v.tensor_mut(l, k) = file.get_len(&format!("{ADAM_V}{name}"), n)?.data;
    }
    Ok((
        TrainState {
            model,
            adam,
            step: meta.step,
        },
        meta.config,
        meta.data,
    ))
}
