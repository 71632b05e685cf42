//! The backend interface the network is written against, and its implementations:
//! [`cpu`] (the reference, the oracle) and [`cuda`]; [`loss`] is the training loss as an
//! op. Every op returns a [`Result`]: a device failure is an error value, and an
//! allocation that does not fit is [`crate::Error::OutOfMemory`], which callers shrink
//! their work on or report.
//!
//! The unit almost every line of rln-spec.md §3 is made of is "conv over a virtual
//! concatenation of inputs → per-channel affine (batch norm) → softplus → addend"; a
//! backend computes it in one call ([`Backend::conv3`] with an [`Epilogue`]) and may
//! fuse it however it likes. Training splits it: the conv with an identity epilogue
//! gives the pre-BN tensor, [`Backend::batch_stats`] its statistics, and
//! [`Backend::epilogue`] the activation. Inference runs in fused stages ([`stage`]: the
//! unit and the RL node after it), [`Backend::stage`], whose default composes the ops.
//!
//! Training state is resident on the backend: [`Backend::Opt`] holds the weights (the
//! FP32 master copy), Adam's moments and step counter and the BN running statistics
//! where the backend computes, and [`Backend::Grads`] a step's parameter gradients where
//! the backward pass produced them ([`crate::net::Rln::backward_into`]); one
//! [`Backend::opt_step`] runs Adam and the running-statistics update there. The CPU keeps
//! all of it on the host (the reference arithmetic); CUDA keeps it on the device, so a
//! step downloads no gradients.

pub mod cpu;
pub mod cuda;
pub mod loss;
pub mod optim;
pub mod stage;

use crate::error::Result;
use crate::model::{Model, ParamKind, Params, Variant};
use crate::real::Real;
use crate::tensor::{Shape, Tensor};
use loss::LossTerms;
use optim::Adam;

/// What a trailing addend of a layer is (spec §3: `+ sp(xd)`, `+ sp(x)`, `+ 1`).
pub enum Addend<'a, X, T> {
    None,
    /// A constant (bp2 = sp(BN(conv)) + 1).
    Const(T),
    /// softplus of a one-channel tensor, broadcast over channels (fp = … + sp(x)).
    SoftplusOf(&'a X),
}

/// y = act(scale[c]·z + shift[c]) + addend, per channel c.
pub struct Epilogue<'a, X, T> {
    /// Per-channel scale and shift (batch norm folded); empty slices mean 1 and 0.
    pub scale: &'a [T],
    pub shift: &'a [T],
    pub softplus: bool,
    pub addend: Addend<'a, X, T>,
}

impl<'a, X, T> Epilogue<'a, X, T> {
    /// The raw conv output (training computes batch statistics on it first).
    pub fn identity() -> Self {
        Epilogue {
            scale: &[],
            shift: &[],
            softplus: false,
            addend: Addend::None,
        }
    }

    /// Whether this is [`Epilogue::identity`] (the conv output unchanged).
    pub fn is_identity(&self) -> bool {
        self.scale.is_empty() && self.shift.is_empty() && !self.softplus && matches!(self.addend, Addend::None)
    }
}

/// Batch-norm state needed by the backward pass of a layer in training mode.
#[derive(Clone, Debug, Default)]
pub struct BnTrainState<T> {
    pub gamma: Vec<T>,
    pub beta: Vec<T>,
    pub mean: Vec<T>,
    /// 1 / sqrt(var + eps)
    pub inv_std: Vec<T>,
    /// Nonzero where the backend that made this state keeps the four vectors itself
    /// (its own handle, e.g. a device address; the vectors are then empty): a resident
    /// step's batch norm ([`Backend::bn_train`]) never brings them to the host.
    pub resident: u64,
}

/// What [`Backend::bn_train`] returns: y, the backward pass's state, and the batch
/// statistics where they came to the host.
pub type BnTrained<X, T> = (X, BnTrainState<T>, Option<ChannelStats>);

/// A layer's weight as the ops of a training step receive it: the host values (of the
/// model the network is bound to) and, in a resident step ([`crate::net::Rln::resident`]),
/// the backend's resident state, whose master copy a backend that keeps one uses instead
/// (the host values may then be older: the host mirror is refreshed only when read).
pub struct LayerWeight<'a, B: Backend + ?Sized> {
    pub layer: usize,
    pub host: &'a [B::T],
    pub opt: Option<&'a B::Opt>,
}

impl<B: Backend + ?Sized> Clone for LayerWeight<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for LayerWeight<'_, B> {}

/// Per-channel batch statistics: mean and biased variance (computed in f64).
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

/// Gradient rules of spec §5: the true gradient, or the authors' custom gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GradMode {
    /// The authors' training: custom gradients at the RL division and E2 update nodes.
    #[default]
    Paper,
    /// The true gradient of the loss.
    Exact,
}

/// Arithmetic of the training convs (`train --precision`): FP32 throughout, or mixed
/// precision — on CUDA the wide convs (C_in ≥ 4 and C_out ≥ 4: forward, data and weight
/// gradients) on the tensor cores with bf16 operands and f32 accumulation, everything else
/// (FP32 master weights, the RL division and update, the loss, batch-norm statistics, Adam)
/// in FP32/f64 as before. The CPU backend trains in FP32 only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainPrecision {
    #[default]
    Fp32,
    /// bf16 tensor-core convs for the wide layers (CUDA only).
    Mixed,
}

impl std::fmt::Display for TrainPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrainPrecision::Fp32 => "fp32",
            TrainPrecision::Mixed => "mixed",
        })
    }
}

/// Where a backward pass puts the gradient of each trainable tensor (layer, kind).
pub trait GradSink {
    /// Stores the gradient of tensor (`layer`, `kind`), given as host values.
    fn put(&mut self, layer: usize, kind: ParamKind, g: Vec<f64>) -> Result<()>;
}

/// The host's gradient set: the tensor is replaced by `g`.
impl GradSink for Params<f64> {
    fn put(&mut self, layer: usize, kind: ParamKind, g: Vec<f64>) -> Result<()> {
        *self.tensor_mut(layer, kind) = g;
        Ok(())
    }
}

/// [`Backend::bn_train`] composed of [`Backend::batch_stats`] (to the host) and
/// [`Backend::epilogue`]: the fold in f64 on the host (the reference arithmetic).
pub fn bn_train_composed<B: Backend + ?Sized>(
    b: &B,
    z: &B::X,
    gamma: &[B::T],
    beta: &[B::T],
    eps: f64,
    softplus: bool,
    addend: Addend<'_, B::X, B::T>,
) -> Result<BnTrained<B::X, B::T>> {
    let stats = b.batch_stats(z)?;
    let inv_std: Vec<f64> = stats.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let scale: Vec<B::T> = (0..gamma.len())
        .map(|c| B::T::of(gamma[c].f64() * inv_std[c]))
        .collect();
    let shift: Vec<B::T> = (0..gamma.len())
        .map(|c| B::T::of(beta[c].f64() - stats.mean[c] * gamma[c].f64() * inv_std[c]))
        .collect();
    let y = b.epilogue(
        z,
        &Epilogue {
            scale: &scale,
            shift: &shift,
            softplus,
            addend,
        },
    )?;
    let bn = BnTrainState {
        gamma: gamma.to_vec(),
        beta: beta.to_vec(),
        mean: stats.mean.iter().map(|&m| B::T::of(m)).collect(),
        inv_std: inv_std.into_iter().map(B::T::of).collect(),
        resident: 0,
    };
    Ok((y, bn, Some(stats)))
}

/// Recorded work ([`Backend::capture_end`]) that can be run again.
pub trait StepReplay: Send {
    /// Enqueues one run.
    fn replay(&self) -> Result<()>;
    /// Kernel launches in one run.
    fn launches(&self) -> usize;
}

/// The operations of the network (rln-spec.md §3) and their gradients.
/// `X` is the backend's tensor (N×C×D×H×W); weights are host slices in engine layout.
pub trait Backend: Sync {
    type T: Real;
    type X: Send + Sync;
    /// A training step's parameter gradients where this backend produced them (host
    /// [`Params`] on the CPU, one device buffer on CUDA).
    type Grads: GradSink + Send;
    /// The trainable state resident on this backend: weights, Adam's moments and step
    /// counter, BN running statistics (see [`Backend::opt_new`]).
    type Opt: Send;

    fn shape(&self, x: &Self::X) -> Shape;
    /// A host tensor as this backend's tensor (a copy; an upload on a device).
    fn from_host(&self, t: &Tensor<Self::T>) -> Result<Self::X>;
    /// This backend's tensor as a host tensor (a copy; a download on a device).
    fn to_host(&self, x: &Self::X) -> Result<Tensor<Self::T>>;

    // ---- forward ----
    /// 3×3×3 conv (zero padding 1, no bias) over the channel concatenation of `inputs`
    /// (never materialized), followed by `epi`.
    fn conv3(
        &self,
        inputs: &[&Self::X],
        weight: &[Self::T],
        c_out: usize,
        epi: &Epilogue<'_, Self::X, Self::T>,
    ) -> Result<Self::X>;
    /// 2×2×2 stride-2 transposed conv, followed by `epi`.
    fn up2(
        &self,
        x: &Self::X,
        weight: &[Self::T],
        c_out: usize,
        epi: &Epilogue<'_, Self::X, Self::T>,
    ) -> Result<Self::X>;
    /// `epi` applied to a computed tensor.
    fn epilogue(&self, z: &Self::X, epi: &Epilogue<'_, Self::X, Self::T>) -> Result<Self::X>;

    // ---- the weight ops of a training step, with the layer they belong to ----
    /// [`Backend::conv3`] with layer `w.layer`'s weight (a backend with resident weights
    /// reads its own copy during a resident step).
    fn conv3_w(
        &self,
        inputs: &[&Self::X],
        w: LayerWeight<'_, Self>,
        c_out: usize,
        epi: &Epilogue<'_, Self::X, Self::T>,
    ) -> Result<Self::X> {
        self.conv3(inputs, w.host, c_out, epi)
    }
    /// [`Backend::up2`] with layer `w.layer`'s weight.
    fn up2_w(
        &self,
        x: &Self::X,
        w: LayerWeight<'_, Self>,
        c_out: usize,
        epi: &Epilogue<'_, Self::X, Self::T>,
    ) -> Result<Self::X> {
        self.up2(x, w.host, c_out, epi)
    }
    /// [`Backend::conv3_backward_data`] with layer `w.layer`'s weight.
    fn conv3_backward_data_w(
        &self,
        dz: &Self::X,
        w: LayerWeight<'_, Self>,
        c_in: &[usize],
        needed: &[bool],
    ) -> Result<Vec<Option<Self::X>>> {
        self.conv3_backward_data(dz, w.host, c_in, needed)
    }
    /// [`Backend::up2_backward_data`] with layer `w.layer`'s weight.
    fn up2_backward_data_w(&self, dz: &Self::X, w: LayerWeight<'_, Self>, c_in: usize) -> Result<Self::X> {
        self.up2_backward_data(dz, w.host, c_in)
    }

    /// Batch norm of layer `layer` in training mode, then `softplus` and `addend`: the
    /// statistics of the batch z (mean, biased variance), inv_std = 1/√(var + eps), scale
    /// γ·inv_std and shift β − mean·γ·inv_std (f64, rounded to T), the activation. Returns
    /// y, what the backward pass needs, and the batch statistics for the running-statistics
    /// update — None where the backend kept them for its resident optimizer step `opt`
    /// (which must then be the `opt` given to [`Backend::opt_step`]). The default composes
    /// [`Backend::batch_stats`] and [`Backend::epilogue`] on the host.
    #[allow(clippy::too_many_arguments)]
    fn bn_train(
        &self,
        z: &Self::X,
        layer: usize,
        gamma: &[Self::T],
        beta: &[Self::T],
        eps: f64,
        softplus: bool,
        addend: Addend<'_, Self::X, Self::T>,
        opt: Option<&Self::Opt>,
    ) -> Result<BnTrained<Self::X, Self::T>> {
        let _ = (layer, opt);
        bn_train_composed(self, z, gamma, beta, eps, softplus, addend)
    }
    /// 2×2×2 mean, stride 2.
    fn avgpool2(&self, x: &Self::X) -> Result<Self::X>;
    /// Mean over channels (keeps one channel).
    fn channel_mean(&self, x: &Self::X) -> Result<Self::X>;
    /// Per-channel mean and biased variance over N, D, H, W.
    fn batch_stats(&self, z: &Self::X) -> Result<ChannelStats>;
    /// RL division node: a / (cm(fp) + eps); a has one channel.
    fn rl_divide(&self, a: &Self::X, fp: &Self::X, eps: f64) -> Result<Self::X>;
    /// RL update node: a · cm(bp); a has one channel.
    fn rl_update(&self, a: &Self::X, bp: &Self::X) -> Result<Self::X>;
    /// One fused stage of inference ([`stage`]: op, folded batch norm, softplus, addend,
    /// RL node). The default composes the ops above exactly as the training-mode network
    /// does; a backend with fused kernels overrides it.
    fn stage(&self, s: &stage::Stage<'_, Self::X, Self::T>) -> Result<stage::StageOut<Self::X>> {
        stage::composed_stage(self, s)
    }

    /// The training loss of spec §5 and its gradients (∂L/∂y, ∂L/∂E1r); `x1` is the
    /// one-channel input, `g` the ground truth.
    fn loss(&self, y: &Self::X, e1r: &Self::X, x1: &Self::X, g: &Self::X) -> Result<(LossTerms, Self::X, Self::X)>;

    /// [`Backend::loss`] in a resident step: the terms may stay where they were computed
    /// (None; [`Backend::opt_loss`] reads them later, so a step need not wait for them).
    fn loss_resident(
        &self,
        y: &Self::X,
        e1r: &Self::X,
        x1: &Self::X,
        g: &Self::X,
        opt: &Self::Opt,
    ) -> Result<(Option<LossTerms>, Self::X, Self::X)> {
        let _ = opt;
        let (t, dy, de) = self.loss(y, e1r, x1, g)?;
        Ok((Some(t), dy, de))
    }

    // ---- backward ----
    /// Gradient through `act(bn(z)) + addend` with respect to z, and the BN parameter
    /// gradients (dγ, dβ). `bn` None: the layer has no batch norm (identity affine).
    /// The addend's own gradient is `dy` itself and is not returned.
    fn epilogue_backward(
        &self,
        z: &Self::X,
        dy: &Self::X,
        softplus: bool,
        bn: Option<&BnTrainState<Self::T>>,
    ) -> Result<(Self::X, Vec<f64>, Vec<f64>)>;
    /// Gradients of conv3 with respect to each input whose `needed` flag is set.
    fn conv3_backward_data(
        &self,
        dz: &Self::X,
        weight: &[Self::T],
        c_in: &[usize],
        needed: &[bool],
    ) -> Result<Vec<Option<Self::X>>>;
    /// Gradient of conv3 with respect to its weight (engine layout).
    fn conv3_backward_weight(&self, inputs: &[&Self::X], dz: &Self::X) -> Result<Vec<f64>>;
    fn up2_backward_data(&self, dz: &Self::X, weight: &[Self::T], c_in: usize) -> Result<Self::X>;
    fn up2_backward_weight(&self, x: &Self::X, dz: &Self::X) -> Result<Vec<f64>>;
    /// Gradients of q = a / (cm(fp) + eps): (∂L/∂a, ∂L/∂fp) under `mode`.
    fn rl_divide_backward(
        &self,
        a: &Self::X,
        fp: &Self::X,
        eps: f64,
        dq: &Self::X,
        mode: GradMode,
    ) -> Result<(Self::X, Self::X)>;
    /// Gradients of e = a · cm(bp): (∂L/∂a, ∂L/∂bp) under `mode`.
    fn rl_update_backward(&self, a: &Self::X, bp: &Self::X, de: &Self::X, mode: GradMode)
        -> Result<(Self::X, Self::X)>;
    fn channel_mean_backward(&self, dy: &Self::X, channels: usize) -> Result<Self::X>;
    /// acc += t
    fn accumulate(&self, acc: &mut Self::X, t: &Self::X) -> Result<()>;

    // ---- gradients into a resident gradient set ----
    /// An empty gradient set for `variant` (every tensor is written by one backward pass).
    fn grads_new(&self, variant: Variant) -> Result<Self::Grads>;
    /// [`Backend::epilogue_backward`] with dγ, dβ stored into `grads` (layer `layer`,
    /// nothing stored when `bn` is None); returns ∂L/∂z.
    fn epilogue_backward_into(
        &self,
        z: &Self::X,
        dy: &Self::X,
        softplus: bool,
        bn: Option<&BnTrainState<Self::T>>,
        grads: &mut Self::Grads,
        layer: usize,
    ) -> Result<Self::X> {
        let (dz, dgamma, dbeta) = self.epilogue_backward(z, dy, softplus, bn)?;
        if bn.is_some() {
            grads.put(layer, ParamKind::Gamma, dgamma)?;
            grads.put(layer, ParamKind::Beta, dbeta)?;
        }
        Ok(dz)
    }
    /// [`Backend::conv3_backward_weight`] stored into `grads` as layer `layer`'s weight.
    fn conv3_backward_weight_into(
        &self,
        inputs: &[&Self::X],
        dz: &Self::X,
        grads: &mut Self::Grads,
        layer: usize,
    ) -> Result<()> {
        let g = self.conv3_backward_weight(inputs, dz)?;
        grads.put(layer, ParamKind::Weight, g)
    }
    /// [`Backend::up2_backward_weight`] stored into `grads` as layer `layer`'s weight.
    fn up2_backward_weight_into(&self, x: &Self::X, dz: &Self::X, grads: &mut Self::Grads, layer: usize) -> Result<()> {
        let g = self.up2_backward_weight(x, dz)?;
        grads.put(layer, ParamKind::Weight, g)
    }

    // ---- the resident training state (Adam, spec §5; running statistics, spec §4) ----
    /// The state of `model` (weights, running statistics) and `adam` (moments, step
    /// counter, schedule) copied to this backend (an upload on a device).
    fn opt_new(&self, model: &Model<Self::T>, adam: &Adam) -> Result<Self::Opt>;
    /// One optimizer step: Adam (the authors' TF1 form, [`Adam::update`]'s arithmetic) with
    /// `grads`, then the running statistics `r ← m·r + (1−m)·batch` with the batch
    /// statistics `stats` (per layer, None without batch norm). Afterwards `model`, the
    /// host's mirror that the ops read weights from, holds the new weights and statistics.
    /// Returns false, with nothing changed, when a gradient is not finite.
    fn opt_step(
        &self,
        opt: &mut Self::Opt,
        grads: &Self::Grads,
        stats: &[Option<ChannelStats>],
        model: &mut Model<Self::T>,
    ) -> Result<bool>;
    /// [`Backend::opt_step`] without waiting for its outcome: Some(applied) where the
    /// backend knows it at once (and `model` holds the new state), None where the step
    /// was only queued (on a device: no copy to the host, no synchronization; `model` is
    /// not updated) — [`Backend::opt_poll`] then reports. The default is `opt_step`.
    fn opt_step_queued(
        &self,
        opt: &mut Self::Opt,
        grads: &Self::Grads,
        stats: &[Option<ChannelStats>],
        model: &mut Model<Self::T>,
    ) -> Result<Option<bool>> {
        self.opt_step(opt, grads, stats, model).map(Some)
    }
    /// After queued steps: None when every one of them was applied (then `model` holds
    /// the current weights and statistics), or Some(k) when step k (Adam's counter) had a
    /// non-finite loss or gradient: it and every step after it changed nothing (the state
    /// is that before step k; the steps taken are k). Returns the loss of the last step
    /// too where the backend kept it ([`Backend::loss_resident`]).
    fn opt_poll(&self, opt: &mut Self::Opt, model: &mut Model<Self::T>) -> Result<(Option<u64>, Option<LossTerms>)> {
        let _ = (opt, model);
        Ok((None, None))
    }

    /// The host's part of the next queued step, done ahead of it (on a device: lr_t into
    /// device memory), so that the step's own work needs nothing from the host and can be
    /// captured or replayed ([`Backend::capture_begin`]).
    fn opt_prepare(&self, opt: &Self::Opt) -> Result<()> {
        let _ = opt;
        Ok(())
    }
    /// Counts one replayed step in `opt` (what [`Backend::opt_step_queued`] does on the
    /// host when the step runs as a replay of a captured graph).
    fn opt_advance(&self, opt: &mut Self::Opt) {
        let _ = opt;
    }

    // ---- one graph per step ----
    /// Copies host tensor `t` into `dst` (same shape): the upload into a fixed buffer
    /// that a replayed step reads.
    fn write_host(&self, dst: &mut Self::X, t: &Tensor<Self::T>) -> Result<()> {
        *dst = self.from_host(t)?;
        Ok(())
    }
    /// [`Backend::write_host`] into the fixed batch buffer `slot` (the training loop's
    /// double buffers: 2k for x, 2k + 1 for g of buffer k), where the backend may copy
    /// asynchronously (CUDA: from pinned memory on a copy stream, while the previous step
    /// runs), ordered after the last step marked by [`Backend::staged_read`] of that slot
    /// and before the work enqueued afterwards.
    fn write_host_staged(&self, slot: usize, dst: &mut Self::X, t: &Tensor<Self::T>) -> Result<()> {
        let _ = slot;
        self.write_host(dst, t)
    }
    /// The work enqueued so far is the last reader of batch buffer `slot` (its next
    /// [`Backend::write_host_staged`] waits for it).
    fn staged_read(&self, slot: usize) -> Result<()> {
        let _ = slot;
        Ok(())
    }
    /// Whether [`Backend::capture_begin`] records (the training loop then replays its step).
    fn records_graphs(&self) -> bool {
        false
    }
    /// Starts recording the backend's work as a graph instead of running it; false where
    /// the backend cannot (the default): the caller then runs its work op by op. During a
    /// recording nothing may come to or go from the host.
    fn capture_begin(&self) -> Result<bool> {
        Ok(false)
    }
    /// Ends the recording: the graph, which runs the recorded work once per replay.
    fn capture_end(&self) -> Result<Box<dyn StepReplay>> {
        Err(crate::error::Error::invalid("this backend records no graphs"))
    }

    /// The whole resident state as host values (for a checkpoint): weights and running
    /// statistics into `model`, Adam's moments and step counter returned.
    fn opt_download(&self, opt: &Self::Opt, model: &mut Model<Self::T>) -> Result<Adam>;

    // ---- shapes ----
    /// Mirror-pads D, H, W up to even sizes (symmetric reflection, edge repeated).
    fn pad_even(&self, x: &Self::X) -> Result<Self::X>;
    /// The leading `shape` corner of `x` (undoes pad_even).
    fn crop(&self, x: &Self::X, shape: Shape) -> Result<Self::X>;
    /// Places `x` in the leading corner of a zero tensor of `shape` (the gradient of crop).
    fn uncrop_zeros(&self, x: &Self::X, shape: Shape) -> Result<Self::X>;
}
