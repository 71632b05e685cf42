//! The fused stages of inference (rln-spec §3 with running statistics) as one backend op,
//! [`crate::backend::Backend::stage`]: a conv (or up2, avgpool2, channel mean) with its
//! folded batch norm, softplus and addend, followed by the RL node the spec puts after it
//! (division and its batch norm, update and its batch norm and softplus, or the channel
//! mean of the output). The network's table of stages is `net::infer`; this module is
//! what a stage is and its composed default ([`composed_stage`]), which is exactly the
//! sequence of ops `net::Rln::forward` runs for the same lines, so a backend that does
//! not override the op (the CPU) computes the same numbers either way. A backend with
//! fused kernels (CUDA inference) overrides [`crate::backend::Backend::stage`] and falls
//! back to [`composed_stage`] for the stages its kernels do not cover.

use super::{Addend, Backend, Epilogue};
use crate::error::{Error, Result};
use crate::model::L;

/// The op a stage starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageOp {
    /// 2×2×2 mean, stride 2 (no weights, no epilogue).
    Pool,
    /// Mean over channels (no weights, no epilogue).
    ChannelMean,
    /// 3×3×3 conv over the concatenation of the inputs, then the epilogue.
    Conv3,
    /// 2×2×2 stride-2 transposed conv, then the epilogue.
    Up2,
}

/// What follows the op and its epilogue (the unit's output u).
pub enum Node<'a, X, T> {
    /// u itself.
    None,
    /// dv = post(a / (cm(u) + eps)): the RL division and its batch norm.
    Divide {
        a: &'a X,
        eps: f64,
        post: Epilogue<'a, X, T>,
    },
    /// E = post(r) with r = a · cm(u) (E_raw, also returned when `keep_raw`): the RL
    /// update and its batch norm and softplus.
    Update {
        a: &'a X,
        post: Epilogue<'a, X, T>,
        keep_raw: bool,
    },
    /// y = cm(u): the network's output.
    Mean,
}

/// One fused stage: `op` over `inputs` with `weight` (engine layout) and `epi`, then `node`.
pub struct Stage<'a, X, T> {
    /// The layer whose weights the op uses (None for Pool and ChannelMean), so that a
    /// backend which folded and packed the model's weights when it was bound to the
    /// model finds its copy.
    pub layer: Option<L>,
    pub op: StageOp,
    pub inputs: &'a [&'a X],
    pub weight: &'a [T],
    pub c_out: usize,
    pub epi: Epilogue<'a, X, T>,
    pub node: Node<'a, X, T>,
}

/// What a stage produces: its output, and E_raw for an update stage with `keep_raw`.
pub struct StageOut<X> {
    pub out: X,
    pub raw: Option<X>,
}

/// The stage composed of the backend's ops, in the order `net::Rln::forward` runs them.
pub fn composed_stage<B: Backend + ?Sized>(b: &B, s: &Stage<'_, B::X, B::T>) -> Result<StageOut<B::X>> {
    let one = |what: &str| -> Result<&B::X> {
        match s.inputs {
            [x] => Ok(*x),
            _ => Err(Error::invalid(format!(
                "the {what} stage takes one input, got {}",
                s.inputs.len()
            ))),
        }
    };
    let u = match s.op {
        StageOp::Pool => b.avgpool2(one("avgpool2")?)?,
        StageOp::ChannelMean => b.channel_mean(one("channel mean")?)?,
        StageOp::Conv3 => b.conv3(s.inputs, s.weight, s.c_out, &s.epi)?,
        StageOp::Up2 => b.up2(one("up2")?, s.weight, s.c_out, &s.epi)?,
    };
    Ok(match &s.node {
        Node::None => StageOut { out: u, raw: None },
        Node::Divide { a, eps, post } => {
            let q = b.rl_divide(a, &u, *eps)?;
            drop(u);
            StageOut {
                out: b.epilogue(&q, post)?,
                raw: None,
            }
        }
        Node::Update { a, post, keep_raw } => {
            let r = b.rl_update(a, &u)?;
            drop(u);
            StageOut {
                out: b.epilogue(&r, post)?,
                raw: keep_raw.then_some(r),
            }
        }
        Node::Mean => StageOut {
            out: b.channel_mean(&u)?,
            raw: None,
        },
    })
}

impl<'a, X, T> Stage<'a, X, T> {
    /// A stage without weights (Pool, ChannelMean) on one input.
    pub fn plain(op: StageOp, inputs: &'a [&'a X]) -> Self {
        Stage {
            layer: None,
            op,
            inputs,
            weight: &[],
            c_out: 0,
            epi: Epilogue {
                scale: &[],
                shift: &[],
                softplus: false,
                addend: Addend::None,
            },
            node: Node::None,
        }
    }
}
