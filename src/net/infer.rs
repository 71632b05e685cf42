//! Inference: the forward pass of rln-spec §3 with running statistics, as a table of fused
//! stages ([`INFER_STAGES`]) that [`Rln::infer`] walks, one [`Backend::stage`] call per
//! row. Each row is a conv (or up2, avgpool2, channel mean) with its batch norm folded
//! into an affine map, its softplus and addend, and the RL node that follows it in the
//! spec; the backend composes it of its ops (the CPU: the same ops, in the same order, as
//! [`Rln::forward`] in training mode runs) or runs it as one fused kernel (CUDA).
//!
//! The walk frees every activation after the last row that reads it (the liveness comes
//! from the table), so a backend that allocates per stage holds at most the live set of
//! the spec's graph. Dual-view ("concat") models have two more rows (the channel mean of
//! the input and its pooling); in single-view models x̄ is x and x̄d is xd.

use super::{has_softplus, Rln};
use crate::backend::stage::{Node, Stage, StageOp};
use crate::backend::{Addend, Backend, Epilogue};
use crate::error::{Error, Result};
use crate::model::L;
use crate::real::Real;

/// The tensors of inference (spec §3 names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// The (mirror-padded) input, C_in channels.
    X,
    /// Its channel mean (dual-view; x itself in single-view models).
    X1,
    Xd,
    /// avgpool2 of x̄ (dual-view; xd itself in single-view models).
    Xd1,
    A1,
    A2,
    Dv1,
    B1,
    B2,
    B3,
    U,
    E1,
    E1r,
    C1,
    Dv2,
    D1,
    E2,
    E2r,
    F1,
    F2,
    Y,
}
const NUM_ACTS: usize = Act::Y as usize + 1;

/// The addend of a stage's epilogue (spec: `+ sp(xd)`, `+ sp(x)`, `+ 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddendRow {
    None,
    SoftplusOf(Act),
    One,
}

/// The RL node after a stage's unit, with the layer of its batch norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeRow {
    None,
    /// post(a / (cm(u) + ε)); post without softplus (the dv layers).
    Divide {
        a: Act,
        post: L,
    },
    /// post(a · cm(u)) with softplus (the E layers); E_raw = a · cm(u) is `raw`.
    Update {
        a: Act,
        post: L,
        raw: Act,
    },
    /// cm(u).
    Mean,
}

/// One row of the inference table.
#[derive(Clone, Copy, Debug)]
pub struct InferStage {
    pub op: StageOp,
    /// The layer whose weights and batch norm the op uses.
    pub layer: Option<L>,
    pub inputs: &'static [Act],
    pub addend: AddendRow,
    pub node: NodeRow,
    pub out: Act,
    /// Present in dual-view models only.
    pub dual_only: bool,
}

const fn conv(layer: L, inputs: &'static [Act], out: Act) -> InferStage {
    InferStage {
        op: StageOp::Conv3,
        layer: Some(layer),
        inputs,
        addend: AddendRow::None,
        node: NodeRow::None,
        out,
        dual_only: false,
    }
}

const fn plain(op: StageOp, input: &'static [Act], out: Act, dual_only: bool) -> InferStage {
    InferStage {
        op,
        layer: None,
        inputs: input,
        addend: AddendRow::None,
        node: NodeRow::None,
        out,
        dual_only,
    }
}

const fn with(s: InferStage, addend: AddendRow, node: NodeRow) -> InferStage {
    InferStage { addend, node, ..s }
}

use Act::*;

/// The forward pass of spec §3 with running statistics, one fused stage per row, in the
/// order the CUDA kernels run (the launch trace of tests/data/launch-trace/).
pub const INFER_STAGES: [InferStage; 18] = [
    // input part (dual-view: x̄ = cm(x), x̄d = avgpool2(x̄))
    plain(StageOp::Pool, &[X], Xd, false),
    plain(StageOp::ChannelMean, &[X], X1, true),
    plain(StageOp::Pool, &[X1], Xd1, true),
    // down-scale part (FP1, DV1, BP1 at half resolution)
    conv(L::H1FpConv1, &[Xd], A1),
    conv(L::H1FpConv2, &[A1], A2),
    // dv1 = BN(x̄d / (cm(sp(BN(conv)) + sp(x̄d)) + ε))
    with(
        conv(L::H1FpConv3, &[A1, A2], Dv1),
        AddendRow::SoftplusOf(Xd1),
        NodeRow::Divide { a: Xd1, post: L::H1Dv },
    ),
    conv(L::H1BpConv1, &[Dv1], B1),
    conv(L::H1BpConv2, &[B1], B2),
    conv(L::H1BpConv3, &[B2, B1], B3),
    InferStage {
        op: StageOp::Up2,
        ..conv(L::H1BpUp, &[B3], U)
    },
    // E1 = sp(BN(x̄ · cm(bp1))), E1r = x̄ · cm(bp1)
    with(
        conv(L::H1BpConv4, &[U], E1),
        AddendRow::None,
        NodeRow::Update {
            a: X1,
            post: L::H1E,
            raw: E1r,
        },
    ),
    // original-scale part (FP2, DV2, BP2)
    conv(L::H2FpConv1, &[X], C1),
    with(
        conv(L::H2FpConv2, &[C1], Dv2),
        AddendRow::SoftplusOf(X1),
        NodeRow::Divide { a: X1, post: L::H2Dv },
    ),
    conv(L::H2BpConv1, &[Dv2], D1),
    // E2 = sp(BN(E1 · cm(sp(BN(conv)) + 1)))
    with(
        conv(L::H2BpConv2, &[D1], E2),
        AddendRow::One,
        NodeRow::Update {
            a: E1,
            post: L::H2E,
            raw: E2r,
        },
    ),
    // merge part
    conv(L::H3Conv1, &[E2], F1),
    conv(L::H3Conv2, &[F1, E2, E1], F2),
    with(conv(L::H3Conv3, &[F1, F2], Y), AddendRow::None, NodeRow::Mean),
];

/// The activations a row reads (inputs, the addend's and the node's operands).
fn reads(s: &InferStage) -> impl Iterator<Item = Act> + '_ {
    let addend = match s.addend {
        AddendRow::SoftplusOf(a) => Some(a),
        _ => None,
    };
    let node = match s.node {
        NodeRow::Divide { a, .. } | NodeRow::Update { a, .. } => Some(a),
        _ => None,
    };
    s.inputs.iter().copied().chain(addend).chain(node)
}

/// What inference returns, cropped back to the input's size.
pub struct Inferred<X> {
    /// y (N×1×D×H×W).
    pub prediction: X,
    /// E1r and E2r, when asked for.
    pub e1_raw: Option<X>,
    pub e2_raw: Option<X>,
}

impl<B: Backend> Rln<'_, B> {
    /// The forward pass with running statistics on x (N×C_in×D×H×W, normalized; odd sizes
    /// are mirror-padded to even and the outputs cropped back), walking [`INFER_STAGES`];
    /// with `keep_raw` also E1r and E2r.
    pub fn infer(&self, x: &B::X, keep_raw: bool) -> Result<Inferred<B::X>> {
        let b = self.b;
        let (input_shape, c_in) = self.checked_input(x)?;
        let dual = c_in > 1;
        let odd = input_shape.d % 2 + input_shape.h % 2 + input_shape.w % 2 != 0;
        let padded = if odd { Some(b.pad_even(x)?) } else { None };
        let x = padded.as_ref().unwrap_or(x);
        // in single-view models x̄ is x and x̄d is xd
        let name = |a: Act| match (dual, a) {
            (false, X1) => X,
            (false, Xd1) => Xd,
            _ => a,
        };
        let rows: Vec<&InferStage> = INFER_STAGES.iter().filter(|s| dual || !s.dual_only).collect();
        // the last row reading each activation (outputs are never freed)
        let mut last = [usize::MAX; NUM_ACTS];
        for (i, s) in rows.iter().enumerate() {
            for a in reads(s) {
                last[name(a) as usize] = i;
            }
        }
        let mut acts: Vec<Option<B::X>> = (0..NUM_ACTS).map(|_| None).collect();
        let eps = self.model.config.div_eps;
        for (i, s) in rows.iter().enumerate() {
            let out = {
                let get = |a: Act| -> Result<&B::X> {
                    match name(a) {
                        X => Ok(x),
                        a => acts[a as usize].as_ref().ok_or_else(|| {
                            Error::invalid(format!("inference table: {a:?} read before it is computed"))
                        }),
                    }
                };
                let inputs = s.inputs.iter().map(|&a| get(a)).collect::<Result<Vec<_>>>()?;
                let folded = |l: Option<L>| l.map(|l| self.folded_bn(l)).unwrap_or_default();
                let (scale, shift) = folded(s.layer);
                let addend = match s.addend {
                    AddendRow::None => Addend::None,
                    AddendRow::SoftplusOf(a) => Addend::SoftplusOf(get(a)?),
                    AddendRow::One => Addend::Const(B::T::of(1.0)),
                };
                let post_bn = match s.node {
                    NodeRow::Divide { post, .. } | NodeRow::Update { post, .. } => folded(Some(post)),
                    _ => (vec![], vec![]),
                };
                let post = |l: L| Epilogue {
                    scale: &post_bn.0,
                    shift: &post_bn.1,
                    softplus: has_softplus(l),
                    addend: Addend::None,
                };
                let node = match s.node {
                    NodeRow::None => Node::None,
                    NodeRow::Divide { a, post: l } => Node::Divide {
                        a: get(a)?,
                        eps,
                        post: post(l),
                    },
                    NodeRow::Update { a, post: l, .. } => Node::Update {
                        a: get(a)?,
                        post: post(l),
                        keep_raw,
                    },
                    NodeRow::Mean => Node::Mean,
                };
                let stage = Stage {
                    layer: s.layer,
                    op: s.op,
                    inputs: &inputs,
                    weight: s.layer.map_or(&[][..], |l| self.weight(l)),
                    c_out: s.layer.map_or(0, |l| l.spec().c_out),
                    epi: Epilogue {
                        scale: &scale,
                        shift: &shift,
                        softplus: s.layer.is_some_and(has_softplus),
                        addend,
                    },
                    node,
                };
                b.stage(&stage)?
            };
            acts[s.out as usize] = Some(out.out);
            if let (NodeRow::Update { raw, .. }, Some(r)) = (s.node, out.raw) {
                acts[raw as usize] = Some(r);
            }
            for (a, slot) in acts.iter_mut().enumerate() {
                if last[a] == i {
                    *slot = None;
                }
            }
        }
        let mut take = |a: Act| -> Result<B::X> {
            let t = acts[a as usize]
                .take()
                .ok_or_else(|| Error::invalid(format!("inference table: {a:?} was not computed")))?;
            if odd {
                b.crop(&t, input_shape.with_c(1))
            } else {
                Ok(t)
            }
        };
        let prediction = take(Y)?;
        let (e1_raw, e2_raw) = if keep_raw {
            (Some(take(E1r)?), Some(take(E2r)?))
        } else {
            (None, None)
        };
        Ok(Inferred {
            prediction,
            e1_raw,
            e2_raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::{Model, ModelConfig, Variant};
    use crate::net::BnMode;
    use crate::tensor::{Shape, Tensor};

    /// The table walk computes what the spec walk of [`Rln::forward`] (running
    /// statistics, with a tape: the line-by-line path) computes, bit for bit, on the CPU:
    /// single- and dual-view, even and odd sizes, a batch of two.
    #[test]
    fn the_table_walk_equals_the_spec_walk_bit_for_bit() {
        let b = CpuBackend::<f32>::new();
        for (variant, shape) in [
            (Variant::Single, Shape::new(1, 1, 6, 8, 10)),
            (Variant::Single, Shape::new(2, 1, 5, 7, 9)),
            (Variant::DualConcat, Shape::new(1, 2, 4, 7, 6)),
        ] {
            let model = Model::<f32>::init(
                ModelConfig {
                    variant,
                    ..ModelConfig::default()
                },
                5,
            );
            let x = Tensor::from_vec(
                shape,
                (0..shape.len())
                    .map(|i| ((i * 37 % 101) as f32) / 101.0 + 0.01)
                    .collect(),
            )
            .unwrap();
            let net = Rln::new(&b, &model);
            let spec = net.forward(&x, BnMode::Running, true).unwrap();
            let table = net.infer(&x, true).unwrap();
            assert!(spec.prediction.all_finite());
            for (what, a, t) in [
                ("y", &spec.prediction, &table.prediction),
                ("E1r", &spec.e1_raw, table.e1_raw.as_ref().unwrap()),
                ("E2r", &spec.e2_raw, table.e2_raw.as_ref().unwrap()),
            ] {
                assert_eq!(a.shape, t.shape, "{variant:?} {shape} {what}");
                let same = a.data.iter().zip(&t.data).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(
                    same,
                    "{variant:?} {shape} {what}: the table walk differs from the spec walk"
                );
            }
            // without E_raw, the same prediction
            let y = net.infer(&x, false).unwrap();
            assert!(y.e1_raw.is_none() && y.prediction.data == table.prediction.data);
        }
    }

    /// Every row reads only what an earlier row (or the input) computed, and every
    /// activation but the outputs is read after it is written.
    #[test]
    fn the_table_is_in_dependency_order() {
        for dual in [false, true] {
            let name = |a: Act| match (dual, a) {
                (false, X1) => X,
                (false, Xd1) => Xd,
                _ => a,
            };
            let mut have = vec![X];
            for s in INFER_STAGES.iter().filter(|s| dual || !s.dual_only) {
                for a in reads(s) {
                    assert!(have.contains(&name(a)), "{:?} reads {a:?} before it exists", s.layer);
                }
                have.push(s.out);
                if let NodeRow::Update { raw, .. } = s.node {
                    have.push(raw);
                }
            }
            assert!(have.contains(&Y) && have.contains(&E1r) && have.contains(&E2r));
        }
    }
}
