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
}

/// Batch-norm state needed by the backward pass of a layer in training mode.
#[derive(Clone, Debug)]
pub struct BnTrainState<T> {
    pub gamma: Vec<T>,
    pub beta: Vec<T>,
    pub mean: Vec<T>,
    /// 1 / sqrt(var + eps)
    pub inv_std: Vec<T>,
}

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
