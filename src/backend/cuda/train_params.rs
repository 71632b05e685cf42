//! The CUDA training backend's resident state (issue 16): the FP32 master weights,
//! Adam's moments (f64) and step counter, the batch-norm running statistics, and what a
//! step keeps on the device between its ops — the batch statistics, each batch norm's
//! folded scale/shift and backward parameters, the loss sums, lr_t — live in [`DevOpt`];
//! a backward pass reduces every parameter gradient straight into one device buffer
//! ([`DevGrads`]). One optimizer step is three launches of kernels/train_adam.cu
//! (`t_grad_check`, `t_adam`, `t_running_stats`). A queued step
//! ([`Backend::opt_step_queued`]) copies nothing to the host; [`Backend::opt_poll`] reads
//! the state into the host mirror, the status (a failed step stops every later one: the
//! status is sticky and records the step) and the loss.
//!
//! Precision: the moments stay f64 and every kernel operation is an explicitly rounded
//! f64 intrinsic in the host's order, so given the same gradients a device step equals
//! [`Adam::update`] + [`crate::backend::optim::update_running_stats`] bit for bit (tested on the
//! emulation; f32 moments would save 128 KB and nothing measurable, and would make
//! checkpoints differ between the CPU and the GPU). lr_t is computed on the host by
//! [`crate::backend::optim::lr_t`] (f64 `powf`) and written to device memory before each
//! step (a captured graph freezes kernel arguments). The batch-norm fold and the loss's
//! constants on the device are the host's f64 arithmetic in the host's order, so they
//! too are the host's bits.

use super::*;
use crate::backend::loss::LossTerms;
use crate::backend::optim::{lr_t, LrSchedule, BETA1, BETA2, EPSILON};
use crate::backend::GradSink;
use crate::model::{ParamKind, Params, RunningStats};

/// Gather tables of packed weight layouts: (layer, input channel offset, channels, data
/// gradient) → (i32 indices on the device, their count).
type PackTables = std::collections::HashMap<(usize, usize, usize, bool), (DevMem, usize)>;

/// f32 values per batch-norm layer in [`DevOpt::bn_fold`].
const BN_FOLD: usize = 96;

/// The module of the optimizer kernels and its kernels (loaded with the training kernels).
pub(crate) const ADAM_MODULE: &str = "train_adam";
pub(crate) const ADAM_KERNELS: [&str; 3] = ["t_grad_check", "t_adam", "t_running_stats"];

/// Where each trainable tensor lives in the flat parameter buffers: per layer its
/// weight, then β, then γ (β before γ: the batch-norm gradient reduction writes
/// [Σ dh, Σ dh·x̂] = [∂β, ∂γ] in one piece), and where each batch-norm layer's running
/// mean and variance live in the statistics buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamLayout {
    variant: Variant,
    /// (layer, kind, offset, length) of every non-empty tensor.
    slots: Vec<(usize, ParamKind, usize, usize)>,
    /// Trainable scalars.
    params: usize,
    /// (layer, offset, channels) of every batch-norm layer: mean at offset, variance at
    /// offset + channels.
    bn: Vec<(usize, usize, usize)>,
    /// Running-statistics scalars (2 × BN channels).
    running: usize,
}

impl ParamLayout {
    pub fn new(variant: Variant) -> Self {
        let p = Params::<f64>::zeros(variant);
        let mut slots = Vec::new();
        let mut off = 0;
        for l in 0..p.layers.len() {
            for k in [ParamKind::Weight, ParamKind::Beta, ParamKind::Gamma] {
                let n = p.tensor(l, k).len();
                if n > 0 {
                    slots.push((l, k, off, n));
                    off += n;
                }
            }
        }
        let r = RunningStats::<f64>::initial();
        let mut bn = Vec::new();
        let mut roff = 0;
        for (l, m) in r.mean.iter().enumerate() {
            if !m.is_empty() {
                bn.push((l, roff, m.len()));
                roff += 2 * m.len();
            }
        }
        ParamLayout {
            variant,
            slots,
            params: off,
            bn,
            running: roff,
        }
    }

    /// (offset, length) of tensor (layer, kind).
    /// Whether layer `layer` has a batch norm (its output's statistics are needed).
    pub fn has_bn(&self, layer: usize) -> bool {
        self.bn.iter().any(|b| b.0 == layer)
    }

    fn slot(&self, layer: usize, kind: ParamKind) -> Result<(usize, usize)> {
        self.slots
            .iter()
            .find(|s| s.0 == layer && s.1 == kind)
            .map(|s| (s.2, s.3))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "layer {layer} has no {kind:?} tensor in the {:?} model",
                    self.variant
                ))
            })
    }

    /// Weights of `params` in this layout.
    fn flatten<T: crate::real::Real>(&self, params: &Params<T>) -> Result<Vec<f64>> {
        let mut v = vec![0.0; self.params];
        for &(l, k, off, n) in &self.slots {
            let t = params.tensor(l, k);
            if t.len() != n {
                return Err(Error::invalid(format!(
                    "{} has {} values, the {:?} model {n}",
                    Params::<f64>::name(l, k),
                    t.len(),
                    self.variant
                )));
            }
            v[off..off + n].iter_mut().zip(t).for_each(|(d, s)| *d = s.f64());
        }
        Ok(v)
    }

    /// The inverse of [`Self::flatten`].
    fn unflatten<T: crate::real::Real>(&self, flat: &[T]) -> Params<T> {
        let mut p = Params::<f64>::zeros(self.variant).cast::<T>();
        for &(l, k, off, n) in &self.slots {
            p.tensor_mut(l, k).copy_from_slice(&flat[off..off + n]);
        }
        p
    }
}

/// A step's parameter gradients on the device: f64, in [`ParamLayout`] order.
pub struct DevGrads {
    mem: DevMem,
    layout: ParamLayout,
}

impl GradSink for DevGrads {
    /// A gradient computed elsewhere (on the host), uploaded into its slot.
    fn put(&mut self, layer: usize, kind: ParamKind, g: Vec<f64>) -> Result<()> {
        if g.is_empty() {
            return Ok(());
        }
        let (off, n) = self.layout.slot(layer, kind)?;
        if g.len() != n {
            return Err(Error::invalid(format!(
                "gradient of {} has {} values, expected {n}",
                Params::<f64>::name(layer, kind),
                g.len()
            )));
        }
        self.mem.runtime().htod(self.mem.ptr() + 8 * off as u64, &g)
    }
}

/// The resident training state on the device.
pub struct DevOpt {
    layout: ParamLayout,
    /// f32 [weights (P) | running mean/var (R) | status]: the master weights and running
    /// statistics, and the last step's status word (1: its gradients were finite and it
    /// was applied); downloaded in one piece.
    state: DevMem,
    /// f64 [m (P) | v (P)].
    moments: DevMem,
    /// f64 [lr_t of the next step, its step index, the first failed step of queued steps
    /// (−1: none)]: the first two written by the host before each step (kernel arguments
    /// are frozen in a captured graph; lr_t comes from the host's f64 `powf`, so the
    /// device's Adam stays the CPU's bit for bit).
    scalars: DevMem,
    /// f64, the running-statistics layout: the batch statistics of the step, written by
    /// the resident batch norm ([`CudaTrainBackend::resident_bn_train`]) and read by the
    /// running-statistics update.
    batch: DevMem,
    /// f32, 96 values per batch-norm layer: [scale | shift | γ | β | mean | inv_std] × 16
    /// (t_bn_fold), read by the forward epilogue and the backward pass.
    bn_fold: DevMem,
    /// f64 [`super::LOSS_SLOTS`]: the last resident step's loss sums and constants.
    loss: DevMem,
    /// Gather tables (i32 indices into the state buffer) of the packed conv weights, by
    /// (layer, input channel offset, channels, data gradient); made on first use.
    packs: std::sync::Mutex<PackTables>,
    /// Whether this step's batch statistics are in `batch` (a resident forward pass ran).
    batch_on_device: std::sync::atomic::AtomicBool,
    /// Whether the last step's loss is in `loss`.
    loss_on_device: std::sync::atomic::AtomicBool,
    /// Whether lr_t of the next step is already in `scalars` ([`Backend::opt_prepare`]).
    prepared: std::sync::atomic::AtomicBool,
    /// Steps taken (t of the next step), as Adam counts them.
    step: u64,
    schedule: LrSchedule,
    /// The model's batch-norm momentum (the running-statistics update).
    bn_momentum: f64,
}

impl DevOpt {
    /// Whether layer `layer` has a batch norm in this model.
    pub(super) fn has_bn(&self, layer: usize) -> bool {
        self.layout.has_bn(layer)
    }
    fn state_len(&self) -> usize {
        self.layout.params + self.layout.running + 1
    }
    /// Running-statistics values (mean and variance of every batch-norm channel).
    pub fn running_len(&self) -> usize {
        self.layout.running
    }
    /// Steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }
}

impl CudaTrainBackend {
    pub(super) fn resident_grads(&self, variant: Variant) -> Result<DevGrads> {
        let layout = ParamLayout::new(variant);
        let mem = self.alloc(layout.params * 8)?;
        if !self.rt.poisons() {
            // poisoned (NaN) buffers show a gradient no backward pass wrote; else zeros
            self.rt.memset(mem.ptr(), 0, layout.params * 8)?;
        }
        Ok(DevGrads { mem, layout })
    }

    fn grads_slot(grads: &DevGrads, layer: usize, kind: ParamKind, len: usize) -> Result<u64> {
        let (off, n) = grads.layout.slot(layer, kind)?;
        if n != len {
            return Err(Error::invalid(format!(
                "gradient of {} has {len} values on the device, the model {n}",
                Params::<f64>::name(layer, kind)
            )));
        }
        Ok(grads.mem.ptr() + 8 * off as u64)
    }

    pub(super) fn resident_conv3_wgrad(
        &self,
        inputs: &[&DevTensor],
        dz: &DevTensor,
        grads: &mut DevGrads,
        layer: usize,
    ) -> Result<()> {
        let (part, blocks, nw) = self.conv3_wgrad_partials(inputs, dz)?;
        let dst = Self::grads_slot(grads, layer, ParamKind::Weight, nw)?;
        self.reduce(&part, blocks, nw, 1.0, dst)
    }

    pub(super) fn resident_up2_wgrad(
        &self,
        x: &DevTensor,
        dz: &DevTensor,
        grads: &mut DevGrads,
        layer: usize,
    ) -> Result<()> {
        let (part, blocks, nw) = self.up2_wgrad_partials(x, dz)?;
        let dst = Self::grads_slot(grads, layer, ParamKind::Weight, nw)?;
        self.reduce(&part, blocks, nw, 1.0, dst)
    }

    pub(super) fn resident_epilogue_backward(
        &self,
        z: &DevTensor,
        dy: &DevTensor,
        softplus: bool,
        bn: Option<&BnTrainState<f32>>,
        grads: &mut DevGrads,
        layer: usize,
    ) -> Result<DevTensor> {
        let dst = match bn {
            Some(_) => {
                let c = z.shape.c;
                let beta = Self::grads_slot(grads, layer, ParamKind::Beta, c)?;
                let gamma = Self::grads_slot(grads, layer, ParamKind::Gamma, c)?;
                if gamma != beta + 8 * c as u64 {
                    // the reduction writes [∂β, ∂γ] in one piece
                    return Err(Error::invalid(format!(
                        "layer {layer}: γ does not follow β in the gradient layout"
                    )));
                }
                Some(beta)
            }
            None => None,
        };
        Ok(self.epilogue_backward_to(z, dy, softplus, bn, dst)?.0)
    }

    pub(super) fn resident_opt_new(&self, model: &Model<f32>, adam: &Adam) -> Result<DevOpt> {
        let layout = ParamLayout::new(model.config.variant);
        let mut state: Vec<f32> = layout.flatten(&model.params)?.into_iter().map(|v| v as f32).collect();
        for &(l, _, c) in &layout.bn {
            let (m, v) = (&model.running.mean[l], &model.running.var[l]);
            if m.len() != c || v.len() != c {
                return Err(Error::invalid(format!(
                    "layer {l} has {} running means and {} variances, the model {c} channels",
                    m.len(),
                    v.len()
                )));
            }
            state.extend_from_slice(m);
            state.extend_from_slice(v);
        }
        state.push(1.0);
        let mut moments = layout.flatten(&adam.m)?;
        moments.extend(layout.flatten(&adam.v)?);
        let s = self.alloc(state.len() * 4)?;
        self.rt.htod(s.ptr(), &state)?;
        let mv = self.alloc(moments.len() * 8)?;
        self.rt.htod(mv.ptr(), &moments)?;
        let scalars = self.alloc(3 * 8)?;
        self.rt.htod(scalars.ptr(), &[0.0f64, 0.0, -1.0])?;
        let batch = self.zeros_f64(layout.running)?;
        let bn_fold = self.alloc(layout.bn.len() * BN_FOLD * 4)?;
        let loss = self.zeros_f64(super::LOSS_SLOTS)?;
        Ok(DevOpt {
            layout,
            state: s,
            moments: mv,
            scalars,
            batch,
            bn_fold,
            loss,
            packs: Default::default(),
            batch_on_device: Default::default(),
            loss_on_device: Default::default(),
            prepared: Default::default(),
            step: adam.step,
            schedule: adam.schedule,
            bn_momentum: model.config.bn_momentum,
        })
    }

    /// Downloads the state buffer: weights, running statistics, status word.
    fn download_state(&self, opt: &DevOpt) -> Result<Vec<f32>> {
        let mut v = vec![0.0f32; opt.state_len()];
        self.rt
            .dtoh(&mut v, opt.state.ptr())
            .map_err(|e| Error::Cuda(format!("copying the weights to the host: {e}")))?;
        Ok(v)
    }

    /// Writes weights and running statistics of a downloaded state buffer into `model`.
    fn mirror(opt: &DevOpt, state: &[f32], model: &mut Model<f32>) {
        let lay = &opt.layout;
        model.params = lay.unflatten(&state[..lay.params]);
        let r = &state[lay.params..lay.params + lay.running];
        for &(l, off, c) in &lay.bn {
            model.running.mean[l].copy_from_slice(&r[off..off + c]);
            model.running.var[l].copy_from_slice(&r[off + c..off + 2 * c]);
        }
    }

    pub(super) fn resident_opt_step(
        &self,
        opt: &mut DevOpt,
        grads: &DevGrads,
        stats: &[Option<ChannelStats>],
        model: &mut Model<f32>,
    ) -> Result<bool> {
        let lay = &opt.layout;
        if grads.layout != *lay {
            return Err(Error::invalid(
                "the gradients are of another model variant than the optimizer state",
            ));
        }
        self.resident_opt_queue(opt, grads, stats, false)?;

        // the one synchronization of the optimizer: the host mirror of the new weights
        self.resident_opt_finish(opt, model)
    }

    /// Uploads host batch statistics (per layer, None without batch norm) into `dst`
    /// (f64, the running-statistics layout, [`DevOpt::running_len`] values).
    pub(crate) fn resident_put_batch_stats(
        &self,
        opt: &DevOpt,
        stats: &[Option<ChannelStats>],
        dst: &DevMem,
    ) -> Result<()> {
        let lay = &opt.layout;
        let mut batch = vec![0.0f64; lay.running];
        for &(l, off, c) in &lay.bn {
            let s = stats.get(l).and_then(|s| s.as_ref()).ok_or_else(|| {
                Error::invalid(format!(
                    "no batch statistics of layer {l} for the running-statistics update"
                ))
            })?;
            if s.mean.len() != c || s.var.len() != c {
                return Err(Error::invalid(format!(
                    "batch statistics of layer {l} have {} channels, the model {c}",
                    s.mean.len()
                )));
            }
            batch[off..off + c].copy_from_slice(&s.mean);
            batch[off + c..off + 2 * c].copy_from_slice(&s.var);
        }
        if dst.bytes() < batch.len() * 8 {
            return Err(Error::invalid("the batch-statistics buffer is too small"));
        }
        self.rt.htod(dst.ptr(), &batch)
    }

    /// The host's part of an optimizer step, before its device part: lr_t of step
    /// `opt.step` into device memory (an upload; outside a captured graph).
    pub(crate) fn resident_opt_prepare(&self, opt: &DevOpt) -> Result<()> {
        self.rt
            .htod(opt.scalars.ptr(), &[lr_t(&opt.schedule, opt.step), opt.step as f64])
    }

    /// [`Backend::opt_prepare`]: lr_t of the next step written now; the step's own work
    /// then uploads nothing.
    pub(super) fn resident_opt_prepare_ahead(&self, opt: &DevOpt) -> Result<()> {
        self.resident_opt_prepare(opt)?;
        opt.prepared.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// [`Backend::opt_advance`].
    pub(super) fn resident_opt_advance(&self, opt: &mut DevOpt) {
        opt.step += 1;
        // the replayed step used the prepared lr_t
        opt.prepared.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Queues one optimizer step: the batch statistics (from the host when `stats` has
    /// them, else those the resident forward pass left on the device), lr_t, then the
    /// device part ([`Self::resident_opt_launch`]; `sticky`: a failed earlier step keeps
    /// this one from applying, and the first failure's step is recorded).
    fn resident_opt_queue(
        &self,
        opt: &DevOpt,
        grads: &DevGrads,
        stats: &[Option<ChannelStats>],
        sticky: bool,
    ) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let lay = &opt.layout;
        let on_host = lay
            .bn
            .iter()
            .any(|&(l, _, _)| stats.get(l).is_some_and(|s| s.is_some()));
        if on_host {
            self.resident_put_batch_stats(opt, stats, &opt.batch)?;
        } else if !opt.batch_on_device.load(Relaxed) {
            return Err(Error::invalid(
                "no batch statistics for the running-statistics update (neither from the host nor from a resident forward pass)",
            ));
        }
        opt.batch_on_device.store(false, Relaxed);
        if !opt.prepared.swap(false, Relaxed) {
            self.resident_opt_prepare(opt)?;
        }
        self.resident_opt_launch_mode(opt, grads, opt.batch.ptr(), sticky)
    }

    /// The device's part of an optimizer step: `t_grad_check` (status word), `t_adam` with
    /// lr_t from device memory, `t_running_stats` with the batch statistics at `batch`
    /// (device f64, the running-statistics layout). Reads and writes device memory only
    /// (no upload, no download, no synchronization): capturable in a graph.
    #[cfg(test)]
    pub(crate) fn resident_opt_launch(&self, opt: &DevOpt, grads: &DevGrads, batch: u64) -> Result<()> {
        self.resident_opt_launch_mode(opt, grads, batch, false)
    }

    fn resident_opt_launch_mode(&self, opt: &DevOpt, grads: &DevGrads, batch: u64, sticky: bool) -> Result<()> {
        let lay = &opt.layout;
        if grads.layout != *lay {
            return Err(Error::invalid(
                "the gradients are of another model variant than the optimizer state",
            ));
        }
        let status = opt.state.ptr() + 4 * (lay.params + lay.running) as u64;
        let mut args = TrainArgs {
            part: grads.mem.ptr(),
            out: [status, 0, 0],
            count: lay.params as i64,
            ..TrainArgs::default()
        };
        if sticky {
            args.mode = 1;
            args.stat = opt.scalars.ptr();
            if opt.loss_on_device.load(std::sync::atomic::Ordering::Relaxed) {
                args.inp[1] = opt.loss.ptr();
            }
        }
        self.launch("t_grad_check", (1, 1, 1), 0, &args)?;

        let mut args = TrainArgs::default();
        args.inp[0] = status;
        args.inp[1] = opt.scalars.ptr();
        args.part = grads.mem.ptr();
        args.stat = opt.moments.ptr();
        args.out[0] = opt.state.ptr();
        args.dc[1..6].copy_from_slice(&[BETA1, BETA2, EPSILON, 1.0 - BETA1, 1.0 - BETA2]);
        self.launch_1d("t_adam", lay.params, args)?;

        let m = opt.bn_momentum;
        let mut args = TrainArgs::default();
        args.inp[0] = status;
        args.part = batch;
        args.out[0] = opt.state.ptr() + 4 * lay.params as u64;
        args.dc[0] = m;
        args.dc[1] = 1.0 - m;
        self.launch_1d("t_running_stats", lay.running, args)
    }

    /// After a step's device part: the status word (1: applied) and, when applied, the new
    /// weights and statistics in `model` and the step counter advanced. One download.
    pub(crate) fn resident_opt_finish(&self, opt: &mut DevOpt, model: &mut Model<f32>) -> Result<bool> {
        let state = self.download_state(opt)?;
        if state[state.len() - 1] != 1.0 {
            return Ok(false);
        }
        Self::mirror(opt, &state, model);
        opt.step += 1;
        Ok(true)
    }

    /// [`Backend::opt_step_queued`]: the step queued with no copy to the host; the
    /// status stays on the device (sticky: a failed step stops the ones after it) until
    /// [`Self::resident_opt_poll`].
    pub(super) fn resident_opt_step_queued(
        &self,
        opt: &mut DevOpt,
        grads: &DevGrads,
        stats: &[Option<ChannelStats>],
    ) -> Result<Option<bool>> {
        self.resident_opt_queue(opt, grads, stats, true)?;
        opt.step += 1;
        Ok(None)
    }

    /// [`Backend::opt_poll`]: one download of the state (weights, statistics, status) into
    /// the mirror, the failure record and, where the last step kept it on the device, the
    /// loss sums.
    pub(super) fn resident_opt_poll(
        &self,
        opt: &mut DevOpt,
        model: &mut Model<f32>,
    ) -> Result<(Option<u64>, Option<LossTerms>)> {
        let state = self.download_state(opt)?;
        Self::mirror(opt, &state, model);
        let mut sc = [0.0f64; 3];
        self.rt.dtoh(&mut sc, opt.scalars.ptr())?;
        let failed = (state[state.len() - 1] != 1.0).then_some(sc[2].max(0.0) as u64);
        if let Some(k) = failed {
            // every step from k on changed nothing
            opt.step = k;
            // the next queued steps start clean
            self.rt.htod(opt.scalars.ptr() + 16, &[-1.0f64])?;
            let status = opt.state.ptr() + 4 * (opt.layout.params + opt.layout.running) as u64;
            self.rt.htod(status, &[1.0f32])?;
        }
        let loss = if opt.loss_on_device.load(std::sync::atomic::Ordering::Relaxed) {
            Some(self.loss_terms_at(&opt.loss, 0)?)
        } else {
            None
        };
        Ok((failed, loss))
    }

    /// [`Backend::loss_resident`]: sums, constants and gradients on the device, into the
    /// resident state's loss slots (read by [`Self::resident_opt_poll`]).
    pub(super) fn resident_loss(
        &self,
        y: &DevTensor,
        e1r: &DevTensor,
        x1: &DevTensor,
        g: &DevTensor,
        opt: &DevOpt,
    ) -> Result<(Option<LossTerms>, DevTensor, DevTensor)> {
        let (dy, de) = self.loss_to(y, e1r, x1, g, opt.loss.ptr())?;
        opt.loss_on_device.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok((None, dy, de))
    }

    /// [`Backend::bn_train`] on the resident state: the statistics reduced into `opt`'s
    /// batch buffer, folded with γ, β of the master weights by `t_bn_fold` into the
    /// layer's slot of `opt.bn_fold`, then the epilogue reading them there. No host value
    /// in or out; the returned state points to the slot.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn resident_bn_train(
        &self,
        z: &DevTensor,
        layer: usize,
        eps: f64,
        softplus: bool,
        addend: Addend<'_, DevTensor, f32>,
        opt: &DevOpt,
    ) -> Result<crate::backend::BnTrained<DevTensor, f32>> {
        let lay = &opt.layout;
        let (k, &(_, off, c)) = lay.bn.iter().enumerate().find(|(_, b)| b.0 == layer).ok_or_else(|| {
            Error::invalid(format!(
                "layer {layer} has no batch norm in the {:?} model",
                lay.variant
            ))
        })?;
        if z.shape.c != c {
            return Err(Error::Shape(format!(
                "batch norm of layer {layer}: {} channels, the model {c}",
                z.shape.c
            )));
        }
        let stat = opt.batch.ptr() + 8 * off as u64;
        // the statistics: from the producing conv's epilogue when it summed them (one
        // reduction; t_bn_fold mode 1 makes E[z²] the variance), else two passes over z
        let fold_mode = match self.take_conv_bn_sums(layer, z.ptr()) {
            Some((part, blocks)) => {
                let m = (z.shape.n * z.shape.spatial()) as f64;
                self.reduce(&part, blocks, 2 * c, 1.0 / m, stat)?;
                1
            }
            None => {
                self.batch_stats_to(z, stat)?;
                0
            }
        };
        let (g_off, _) = lay.slot(layer, ParamKind::Gamma)?;
        let (b_off, _) = lay.slot(layer, ParamKind::Beta)?;
        let fold = opt.bn_fold.ptr() + (4 * BN_FOLD * k) as u64;
        let mut args = TrainArgs::default();
        args.inp[0] = opt.state.ptr() + 4 * g_off as u64;
        args.inp[1] = opt.state.ptr() + 4 * b_off as u64;
        args.stat = stat;
        args.out[0] = fold;
        args.ca = c as i32;
        args.dc[0] = eps;
        args.mode = fold_mode;
        self.launch("t_bn_fold", (1, 1, 1), 0, &args)?;
        let y = self.epilogue_at(
            z,
            &Epilogue {
                scale: &[],
                shift: &[],
                softplus,
                addend,
            },
            fold,
        )?;
        opt.batch_on_device.store(true, std::sync::atomic::Ordering::Relaxed);
        let bn = BnTrainState {
            resident: fold + 4 * 32,
            ..Default::default()
        };
        Ok((y, bn, None))
    }

    /// The device address of layer `layer`'s weight in the master copy (f32, engine
    /// layout), checked against `len` values.
    pub(super) fn resident_weight(&self, opt: &DevOpt, layer: usize, len: usize) -> Result<u64> {
        let (off, n) = opt.layout.slot(layer, ParamKind::Weight)?;
        if n != len {
            return Err(Error::invalid(format!(
                "layer {layer}'s weight has {len} values, the resident model {n}"
            )));
        }
        Ok(opt.state.ptr() + 4 * off as u64)
    }

    /// Layer `layer`'s conv weight (`host`: its engine-layout values, whose length and
    /// channel counts are checked) in the packed forward layout of a conv over input
    /// channels [offset, offset + cs) (`data_grad`: the flipped-transposed weight of the
    /// data gradient for that input), gathered from the master copy on the device into a
    /// new buffer. The gather table is made (uploaded) on first use of each layout.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn resident_packed(
        &self,
        opt: &DevOpt,
        layer: usize,
        n: usize,
        c_total: usize,
        c_out: usize,
        offset: usize,
        cs: usize,
        data_grad: bool,
    ) -> Result<DevMem> {
        let base = self.resident_weight(opt, layer, n)? - opt.state.ptr();
        let base = (base / 4) as usize;
        let key = (layer, offset, cs, data_grad);
        let mut packs = opt.packs.lock().unwrap();
        if let std::collections::hash_map::Entry::Vacant(slot) = packs.entry(key) {
            // the packing functions applied to the weights' own indices (exact in f32)
            let ids: Vec<f32> = (0..n).map(|i| (base + i) as f32).collect();
            let table = if data_grad {
                tl::pack_fwd(&tl::flip_transpose(&ids, c_total, c_out, offset, cs), c_out, cs)
            } else {
                tl::pack_fwd(&ids, c_total, c_out)
            };
            let table: Vec<i32> = table.iter().map(|&v| v as i32).collect();
            slot.insert((self.rt.upload(&table)?, table.len()));
        }
        let (table, len) = &packs[&key];
        let len = *len;
        let out = self.alloc(len * 4)?;
        let mut args = TrainArgs::default();
        args.inp[0] = opt.state.ptr();
        args.wt = table.ptr();
        args.out[0] = out.ptr();
        self.launch_1d("t_gather", len, args)?;
        Ok(out)
    }

    pub(super) fn resident_opt_download(&self, opt: &DevOpt, model: &mut Model<f32>) -> Result<Adam> {
        let lay = &opt.layout;
        let state = self.download_state(opt)?;
        Self::mirror(opt, &state, model);
        let mv = self.download_f64(&opt.moments, 2 * lay.params, "Adam's moments")?;
        Ok(Adam {
            m: lay.unflatten(&mv[..lay.params]),
            v: lay.unflatten(&mv[lay.params..]),
            step: opt.step,
            schedule: opt.schedule,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout covers every trainable tensor once, contiguously, with γ right after β
    /// (the batch-norm gradient reduction writes both in one piece), and the running
    /// statistics of every batch norm: the spec's 15 808 weights + 160 BN parameters and
    /// 160 statistics.
    #[test]
    fn the_parameter_layout_is_complete_and_keeps_beta_gamma_together() {
        let lay = ParamLayout::new(Variant::Single);
        assert_eq!(lay.params, 15_808 + 160);
        assert_eq!(lay.running, 160);
        assert_eq!(lay.bn.len(), 17);
        let p = Params::<f64>::zeros(Variant::Single);
        assert_eq!(lay.slots.len(), p.ids().len());
        let mut next = 0;
        for &(l, k, off, n) in &lay.slots {
            assert_eq!(off, next, "slots are contiguous");
            assert_eq!(n, p.tensor(l, k).len());
            next = off + n;
            if k == ParamKind::Gamma {
                let (b, c) = lay.slot(l, ParamKind::Beta).unwrap();
                assert_eq!(b + c, off, "γ of layer {l} follows β");
            }
        }
        // flatten and unflatten are inverse
        let mut q = p.clone();
        let mut i = 0.0;
        q.zip_mut(&p, |x, _| {
            i += 1.0;
            *x = i
        });
        assert_eq!(lay.unflatten(&lay.flatten(&q).unwrap()), q);
        assert!(
            lay.slot(L_H3_CONV1, ParamKind::Gamma).is_err(),
            "h3.conv1 has no batch norm"
        );
    }
    const L_H3_CONV1: usize = crate::model::L::H3Conv1 as usize;

    /// The optimizer kernels are in kernels/train_adam.cu (and in its PTX when nvcc built
    /// it), and nothing else is.
    #[test]
    fn every_optimizer_kernel_is_in_its_module() {
        use crate::backend::cuda::kernels::module;
        let m = module(ADAM_MODULE).expect("kernels/train_adam.cu is embedded");
        for k in ADAM_KERNELS {
            assert!(
                m.source.contains(&format!("{k}(const TrainArgs")),
                "{k} not in train_adam.cu"
            );
            if let Some(ptx) = m.ptx {
                assert!(ptx.contains(&format!(".entry {k}(")), "{k} not in the PTX");
            }
        }
        if let Some(ptx) = m.ptx {
            assert_eq!(ptx.matches(".entry ").count(), ADAM_KERNELS.len());
            // the f64 update is never contracted into an FMA (bit-equality with the host)
            assert!(!ptx.contains("fma.rn.f64"), "an f64 FMA in train_adam.cu");
        }
    }
}
