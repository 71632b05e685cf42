//! The RLN network of rln-spec.md §3, forward and backward, written once against the
//! [`Backend`] interface. Read it next to the spec: every line of §3 is one line of
//! [`Rln::forward`], and [`Rln::backward`] walks the same lines in reverse.
//!
//! Sizes: any D, H, W ≥ 1. The half-resolution part needs even sizes, so odd dimensions
//! are mirror-padded by symmetric reflection (… 1 0 | 0 1 … n−1 | n−1 n−2 …) to even,
//! the spec runs on the padded volume, and every output is cropped back (rln-spec.md
//! §3). Depths 1 and 2 pool to a single half-resolution plane, whose 3×3×3 convs see
//! zero padding above and below — exactly what the spec's 'SAME' convs do on any
//! depth-2 input. The authors' TensorFlow graph (RLN_single.py) pools with
//! `avg_pool3d(padding='VALID')` and up-samples with `conv3d_transpose(padding='VALID')`
//! to the input's shape: on an odd size it drops the last plane from the half-resolution
//! branch and leaves that plane of the up-sampled tensor zero, and on depth 1 the branch
//! is empty. Their scripts only ever feed even sizes; we do not copy that edge defect.
//! On even sizes the engine is their graph (tests/conformance.rs); for every depth 1–9
//! and odd/even H, W it equals `rln_reference.py` on the mirror-padded input, cropped
//! (tests/numerics.rs), and the naive network of tests/common (tests/network.rs).
//!
//! Inference (running statistics, no tape) walks the table of fused stages of [`infer`]
//! ([`Rln::infer`]), one [`Backend::stage`] per row, so that a backend with fused kernels
//! (CUDA) runs the same network; [`Rln::forward`] in that mode is [`Rln::infer`].

use crate::backend::{Addend, Backend, BnTrainState, ChannelStats, Epilogue, GradMode, LayerWeight};
use crate::error::{Error, Result};
use crate::model::{LayerOp, Model, Params, L, NUM_LAYERS};
use crate::real::Real;

pub mod infer;
pub use infer::{Inferred, INFER_STAGES};

/// Which statistics the batch norms use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnMode {
    /// Running statistics (inference).
    Running,
    /// Statistics of the batch (training).
    Batch,
}

/// Layers followed by softplus: all but the two division-node batch norms (dv1, dv2).
const fn has_softplus(l: L) -> bool {
    !matches!(l, L::H1Dv | L::H2Dv)
}

/// Every tensor of one forward pass (spec §3 names). In inference mode the conv layers'
/// pre-BN tensors are not kept.
pub struct Acts<X> {
    /// The (mirror-padded) input, N×C_in×D×H×W.
    pub x: X,
    /// Mean of the input channels when the input has two (dual-view concat), else None.
    pub xbar: Option<X>,
    /// avgpool2 of x (every input channel; read by h1.fp.conv1).
    pub xd: X,
    /// avgpool2 of xbar (dual-view concat only).
    pub xdbar: Option<X>,
    pub a1: X,
    pub a2: X,
    pub fp1: X,
    pub q1: X,
    pub dv1: X,
    pub b1: X,
    pub b2: X,
    pub b3: X,
    pub u: X,
    pub bp1: X,
    pub e1r: X,
    pub e1: X,
    pub c1: X,
    pub fp2: X,
    pub q2: X,
    pub dv2: X,
    pub d1: X,
    pub bp2: X,
    pub e2r: X,
    pub e2: X,
    pub f1: X,
    pub f2: X,
    pub f3: X,
    pub y: X,
}

impl<X> Acts<X> {
    /// The one-channel input used outside the first convs.
    pub fn x1(&self) -> &X {
        self.xbar.as_ref().unwrap_or(&self.x)
    }
    pub fn xd1(&self) -> &X {
        self.xdbar.as_ref().unwrap_or(&self.xd)
    }
}

/// What a forward pass returns: the outputs (cropped back to the input size), and in
/// training mode everything the backward pass needs.
pub struct Forward<B: Backend> {
    /// y, the prediction (N×1×D×H×W).
    pub prediction: B::X,
    /// E1r, the first "iteration"'s update, input of the auxiliary loss.
    pub e1_raw: B::X,
    /// E2r.
    pub e2_raw: B::X,
    /// Batch statistics per layer (training mode), for the running-statistics update.
    pub batch_stats: Vec<Option<ChannelStats>>,
    pub tape: Option<Tape<B>>,
}

/// Saved state for the backward pass.
pub struct Tape<B: Backend> {
    pub acts: Acts<B::X>,
    /// Pre-batch-norm conv outputs per layer.
    z: Vec<Option<B::X>>,
    bn: Vec<Option<BnTrainState<B::T>>>,
}

/// Where a backward pass stores parameter gradients: host tensors, or the backend's
/// resident gradient set.
enum Sink<'g, B: Backend> {
    Host(&'g mut Params<f64>),
    Resident(&'g mut B::Grads),
}

/// The network bound to a backend and a model.
pub struct Rln<'a, B: Backend> {
    pub b: &'a B,
    pub model: &'a Model<B::T>,
    /// The backend's resident training state during a resident step ([`Rln::resident`]):
    /// the training ops read weights and keep batch statistics there.
    pub opt: Option<&'a B::Opt>,
}

struct State<B: Backend> {
    mode: BnMode,
    z: Vec<Option<B::X>>,
    bn: Vec<Option<BnTrainState<B::T>>>,
    stats: Vec<Option<ChannelStats>>,
}

impl<'a, B: Backend> Rln<'a, B> {
    pub fn new(b: &'a B, model: &'a Model<B::T>) -> Self {
        Rln { b, model, opt: None }
    }

    /// The network of a resident training step: the batch-mode ops take layer weights
    /// and batch statistics from (and leave them in) `opt`, the backend's resident state,
    /// where the backend keeps one; `model` is its host mirror (configuration, and the
    /// values of a backend that keeps none).
    pub fn resident(b: &'a B, model: &'a Model<B::T>, opt: &'a B::Opt) -> Self {
        Rln {
            b,
            model,
            opt: Some(opt),
        }
    }

    fn weight(&self, l: L) -> &[B::T] {
        &self.model.params.layers[l as usize].weight
    }

    /// Layer l's weight for a training op.
    fn layer_weight(&self, l: L) -> LayerWeight<'_, B> {
        LayerWeight {
            layer: l as usize,
            host: self.weight(l),
            opt: self.opt,
        }
    }

    /// Batch norm folded into a per-channel affine with running statistics.
    fn folded_bn(&self, l: L) -> (Vec<B::T>, Vec<B::T>) {
        let i = l as usize;
        let p = &self.model.params.layers[i];
        if p.gamma.is_empty() {
            return (vec![], vec![]);
        }
        let eps = self.model.config.bn_eps;
        let (rm, rv) = (&self.model.running.mean[i], &self.model.running.var[i]);
        let scale: Vec<f64> = (0..p.gamma.len())
            .map(|c| p.gamma[c].f64() / (rv[c].f64() + eps).sqrt())
            .collect();
        let shift = (0..p.gamma.len())
            .map(|c| B::T::of(p.beta[c].f64() - rm[c].f64() * scale[c]))
            .collect();
        (scale.into_iter().map(B::T::of).collect(), shift)
    }

    /// One "unit" of the spec: op(inputs) → BN → softplus → addend. `inputs` are the
    /// conv inputs (Conv3/Up2) or the one node a BnOnly layer normalizes.
    fn unit(&self, st: &mut State<B>, l: L, inputs: &[&B::X], addend: Addend<'_, B::X, B::T>) -> Result<B::X> {
        let spec = l.spec();
        let b = self.b;
        let softplus = has_softplus(l);
        let has_bn = spec.has_bn();
        if st.mode == BnMode::Running {
            let (scale, shift) = self.folded_bn(l);
            let epi = Epilogue {
                scale: &scale,
                shift: &shift,
                softplus,
                addend,
            };
            return match spec.op {
                LayerOp::Conv3 => b.conv3(inputs, self.weight(l), spec.c_out, &epi),
                LayerOp::Up2 => b.up2(inputs[0], self.weight(l), spec.c_out, &epi),
                LayerOp::BnOnly => b.epilogue(inputs[0], &epi),
            };
        }
        // training: the weight ops with their layer (a resident step reads the backend's
        // copy of the weights)
        let raw = |epi: &Epilogue<'_, B::X, B::T>| match spec.op {
            LayerOp::Conv3 => b.conv3_w(inputs, self.layer_weight(l), spec.c_out, epi),
            LayerOp::Up2 => b.up2_w(inputs[0], self.layer_weight(l), spec.c_out, epi),
            LayerOp::BnOnly => b.epilogue(inputs[0], epi),
        };
        if !has_bn {
            // training, no batch norm (h3.conv1, h3.conv2): keep z for the backward pass
            let z = raw(&Epilogue::identity())?;
            let y = b.epilogue(
                &z,
                &Epilogue {
                    scale: &[],
                    shift: &[],
                    softplus,
                    addend,
                },
            )?;
            st.z[l as usize] = Some(z);
            return Ok(y);
        }
        // training: z, then batch norm with its statistics and the activation
        let z = match spec.op {
            LayerOp::BnOnly => None,
            _ => Some(raw(&Epilogue::identity())?),
        };
        let zr = z.as_ref().unwrap_or(inputs[0]);
        let p = &self.model.params.layers[l as usize];
        let eps = self.model.config.bn_eps;
        let (y, bn, stats) = b.bn_train(zr, l as usize, &p.gamma, &p.beta, eps, softplus, addend, self.opt)?;
        st.bn[l as usize] = Some(bn);
        st.stats[l as usize] = stats;
        st.z[l as usize] = z;
        Ok(y)
    }

    /// The shape of x and the model's input channel count, which x must have.
    pub(crate) fn checked_input(&self, x: &B::X) -> Result<(crate::tensor::Shape, usize)> {
        let input_shape = self.b.shape(x);
        let c_in = self.model.config.variant.input_channels();
        if input_shape.c != c_in {
            return Err(Error::Shape(format!(
                "the model takes {c_in} input channel(s), the input has {}",
                input_shape.c
            )));
        }
        Ok((input_shape, c_in))
    }

    /// The forward pass of spec §3 on x (N×C_in×D×H×W, normalized; any D, H, W: odd
    /// sizes are mirror-padded to even and the outputs cropped back).
    pub fn forward(&self, x: &B::X, mode: BnMode, keep_tape: bool) -> Result<Forward<B>> {
        if mode == BnMode::Running && !keep_tape {
            let r = self.infer(x, true)?;
            let raw = |t: Option<B::X>| t.ok_or_else(|| Error::invalid("inference returned no E_raw"));
            return Ok(Forward {
                prediction: r.prediction,
                e1_raw: raw(r.e1_raw)?,
                e2_raw: raw(r.e2_raw)?,
                batch_stats: none_vec(),
                tape: None,
            });
        }
        let b = self.b;
        let (input_shape, c_in) = self.checked_input(x)?;
        let mut st = State::<B> {
            mode,
            z: none_vec(),
            bn: none_vec(),
            stats: none_vec(),
        };
        let eps = self.model.config.div_eps;
        let x = b.pad_even(x)?;
        let xbar = if c_in > 1 { Some(b.channel_mean(&x)?) } else { None };
        let x1 = xbar.as_ref().unwrap_or(&x);
        let none = || Addend::None;

        // down-scale part (FP1, DV1, BP1 at half resolution)
        let xd = b.avgpool2(&x)?;
        let xdbar = xbar.as_ref().map(|xb| b.avgpool2(xb)).transpose()?;
        let xd1 = xdbar.as_ref().unwrap_or(&xd);
        let a1 = self.unit(&mut st, L::H1FpConv1, &[&xd], none())?;
        let a2 = self.unit(&mut st, L::H1FpConv2, &[&a1], none())?;
        let fp1 = self.unit(&mut st, L::H1FpConv3, &[&a1, &a2], Addend::SoftplusOf(xd1))?;
        let q1 = b.rl_divide(xd1, &fp1, eps)?;
        let dv1 = self.unit(&mut st, L::H1Dv, &[&q1], none())?;
        let b1 = self.unit(&mut st, L::H1BpConv1, &[&dv1], none())?;
        let b2 = self.unit(&mut st, L::H1BpConv2, &[&b1], none())?;
        let b3 = self.unit(&mut st, L::H1BpConv3, &[&b2, &b1], none())?;
        let u = self.unit(&mut st, L::H1BpUp, &[&b3], none())?;
        let bp1 = self.unit(&mut st, L::H1BpConv4, &[&u], none())?;
        let e1r = b.rl_update(x1, &bp1)?;
        let e1 = self.unit(&mut st, L::H1E, &[&e1r], none())?;

        // original-scale part (FP2, DV2, BP2)
        let c1 = self.unit(&mut st, L::H2FpConv1, &[&x], none())?;
        let fp2 = self.unit(&mut st, L::H2FpConv2, &[&c1], Addend::SoftplusOf(x1))?;
        let q2 = b.rl_divide(x1, &fp2, eps)?;
        let dv2 = self.unit(&mut st, L::H2Dv, &[&q2], none())?;
        let d1 = self.unit(&mut st, L::H2BpConv1, &[&dv2], none())?;
        let bp2 = self.unit(&mut st, L::H2BpConv2, &[&d1], Addend::Const(B::T::of(1.0)))?;
        let e2r = b.rl_update(&e1, &bp2)?;
        let e2 = self.unit(&mut st, L::H2E, &[&e2r], none())?;

        // merge part
        let f1 = self.unit(&mut st, L::H3Conv1, &[&e2], none())?;
        let f2 = self.unit(&mut st, L::H3Conv2, &[&f1, &e2, &e1], none())?;
        let f3 = self.unit(&mut st, L::H3Conv3, &[&f1, &f2], none())?;
        let y = b.channel_mean(&f3)?;

        let crop1 = input_shape.with_c(1);
        let prediction = b.crop(&y, crop1)?;
        let e1_raw = b.crop(&e1r, crop1)?;
        let e2_raw = b.crop(&e2r, crop1)?;
        let tape = keep_tape.then(|| Tape {
            acts: Acts {
                x,
                xbar,
                xd,
                xdbar,
                a1,
                a2,
                fp1,
                q1,
                dv1,
                b1,
                b2,
                b3,
                u,
                bp1,
                e1r,
                e1,
                c1,
                fp2,
                q2,
                dv2,
                d1,
                bp2,
                e2r,
                e2,
                f1,
                f2,
                f3,
                y,
            },
            z: st.z,
            bn: st.bn,
        });
        Ok(Forward {
            prediction,
            e1_raw,
            e2_raw,
            batch_stats: st.stats,
            tape,
        })
    }

    /// Backward of a unit with weights: returns the gradients of the inputs whose
    /// `needed` flag is set and stores the layer's parameter gradients in `grads`.
    fn unit_backward(
        &self,
        tape: &Tape<B>,
        l: L,
        inputs: &[&B::X],
        dy: &B::X,
        needed: &[bool],
        grads: &mut Sink<'_, B>,
    ) -> Result<Vec<Option<B::X>>> {
        let b = self.b;
        let i = l as usize;
        let spec = l.spec();
        let z = tape.z[i].as_ref().expect("forward ran in training mode with a tape");
        let dz = self.epilogue_backward(tape, l, z, dy, grads)?;
        match spec.op {
            LayerOp::Conv3 => {
                match grads {
                    Sink::Host(g) => g.layers[i].weight = b.conv3_backward_weight(inputs, &dz)?,
                    Sink::Resident(g) => b.conv3_backward_weight_into(inputs, &dz, g, i)?,
                }
                let c_in: Vec<usize> = inputs.iter().map(|t| b.shape(t).c).collect();
                b.conv3_backward_data_w(&dz, self.layer_weight(l), &c_in, needed)
            }
            LayerOp::Up2 => {
                match grads {
                    Sink::Host(g) => g.layers[i].weight = b.up2_backward_weight(inputs[0], &dz)?,
                    Sink::Resident(g) => b.up2_backward_weight_into(inputs[0], &dz, g, i)?,
                }
                let dx = if needed[0] {
                    Some(b.up2_backward_data_w(&dz, self.layer_weight(l), spec.c_in)?)
                } else {
                    None
                };
                Ok(vec![dx])
            }
            LayerOp::BnOnly => unreachable!("BnOnly layers go through bn_node_backward"),
        }
    }

    /// Gradient through layer `l`'s epilogue (z its input), with γ, β gradients into `grads`.
    fn epilogue_backward(&self, tape: &Tape<B>, l: L, z: &B::X, dy: &B::X, grads: &mut Sink<'_, B>) -> Result<B::X> {
        let i = l as usize;
        let bn = tape.bn[i].as_ref();
        match grads {
            Sink::Host(g) => {
                let (dz, dgamma, dbeta) = self.b.epilogue_backward(z, dy, has_softplus(l), bn)?;
                g.layers[i].gamma = dgamma;
                g.layers[i].beta = dbeta;
                Ok(dz)
            }
            Sink::Resident(g) => self.b.epilogue_backward_into(z, dy, has_softplus(l), bn, g, i),
        }
    }

    /// Backward of a BnOnly layer: ∂L/∂node, and its γ, β gradients into `grads`.
    fn bn_node_backward(&self, tape: &Tape<B>, l: L, node: &B::X, dy: &B::X, grads: &mut Sink<'_, B>) -> Result<B::X> {
        self.epilogue_backward(tape, l, node, dy, grads)
    }

    fn sum(&self, mut a: B::X, b: &B::X) -> Result<B::X> {
        self.b.accumulate(&mut a, b)?;
        Ok(a)
    }

    /// Gradients of the loss with respect to every trainable tensor, given ∂L/∂y and
    /// ∂L/∂E1r (the auxiliary loss) at the caller's (unpadded) size. `mode` chooses the
    /// true gradient or the authors' custom gradients (spec §5).
    pub fn backward(&self, fwd: &Forward<B>, dy: &B::X, de1r_aux: &B::X, mode: GradMode) -> Result<Params<f64>> {
        let mut g = Params::<f64>::zeros(self.model.config.variant);
        self.backward_to(fwd, dy, de1r_aux, mode, &mut Sink::Host(&mut g))?;
        Ok(g)
    }

    /// [`Rln::backward`] with the parameter gradients stored into the backend's resident
    /// gradient set (on a device they stay there, for [`Backend::opt_step`]).
    pub fn backward_into(
        &self,
        fwd: &Forward<B>,
        dy: &B::X,
        de1r_aux: &B::X,
        mode: GradMode,
        grads: &mut B::Grads,
    ) -> Result<()> {
        self.backward_to(fwd, dy, de1r_aux, mode, &mut Sink::Resident(grads))
    }

    fn backward_to(
        &self,
        fwd: &Forward<B>,
        dy: &B::X,
        de1r_aux: &B::X,
        mode: GradMode,
        g: &mut Sink<'_, B>,
    ) -> Result<()> {
        let b = self.b;
        let tape = fwd
            .tape
            .as_ref()
            .ok_or_else(|| Error::invalid("backward needs a forward pass run with keep_tape"))?;
        let a = &tape.acts;
        let padded = b.shape(&a.y);
        let dy = b.uncrop_zeros(dy, padded)?;
        let de1r_aux = b.uncrop_zeros(de1r_aux, padded)?;
        let eps = self.model.config.div_eps;
        let take = |v: &mut Vec<Option<B::X>>, k: usize| v[k].take().expect("requested gradient");

        // merge part
        let df3 = b.channel_mean_backward(&dy, b.shape(&a.f3).c)?;
        let mut r = self.unit_backward(tape, L::H3Conv3, &[&a.f1, &a.f2], &df3, &[true, true], g)?;
        let (df1_a, df2) = (take(&mut r, 0), take(&mut r, 1));
        let mut r = self.unit_backward(tape, L::H3Conv2, &[&a.f1, &a.e2, &a.e1], &df2, &[true, true, true], g)?;
        let (df1_b, de2_a, de1_a) = (take(&mut r, 0), take(&mut r, 1), take(&mut r, 2));
        let df1 = self.sum(df1_a, &df1_b)?;
        let de2_b = take(
            &mut self.unit_backward(tape, L::H3Conv1, &[&a.e2], &df1, &[true], g)?,
            0,
        );
        let de2 = self.sum(de2_a, &de2_b)?;

        // original-scale part
        let de2r = self.bn_node_backward(tape, L::H2E, &a.e2r, &de2, g)?;
        let (de1_b, dbp2) = b.rl_update_backward(&a.e1, &a.bp2, &de2r, mode)?;
        let dd1 = take(
            &mut self.unit_backward(tape, L::H2BpConv2, &[&a.d1], &dbp2, &[true], g)?,
            0,
        );
        let ddv2 = take(
            &mut self.unit_backward(tape, L::H2BpConv1, &[&a.dv2], &dd1, &[true], g)?,
            0,
        );
        let dq2 = self.bn_node_backward(tape, L::H2Dv, &a.q2, &ddv2, g)?;
        let (_, dfp2) = b.rl_divide_backward(a.x1(), &a.fp2, eps, &dq2, mode)?;
        let dc1 = take(
            &mut self.unit_backward(tape, L::H2FpConv2, &[&a.c1], &dfp2, &[true], g)?,
            0,
        );
        self.unit_backward(tape, L::H2FpConv1, &[&a.x], &dc1, &[false], g)?;

        // down-scale part
        let de1 = self.sum(de1_a, &de1_b)?;
        let de1r = self.sum(self.bn_node_backward(tape, L::H1E, &a.e1r, &de1, g)?, &de1r_aux)?;
        let (_, dbp1) = b.rl_update_backward(a.x1(), &a.bp1, &de1r, mode)?;
        let du = take(
            &mut self.unit_backward(tape, L::H1BpConv4, &[&a.u], &dbp1, &[true], g)?,
            0,
        );
        let db3 = take(&mut self.unit_backward(tape, L::H1BpUp, &[&a.b3], &du, &[true], g)?, 0);
        let mut r = self.unit_backward(tape, L::H1BpConv3, &[&a.b2, &a.b1], &db3, &[true, true], g)?;
        let (db2, db1_a) = (take(&mut r, 0), take(&mut r, 1));
        let db1_b = take(
            &mut self.unit_backward(tape, L::H1BpConv2, &[&a.b1], &db2, &[true], g)?,
            0,
        );
        let db1 = self.sum(db1_a, &db1_b)?;
        let ddv1 = take(
            &mut self.unit_backward(tape, L::H1BpConv1, &[&a.dv1], &db1, &[true], g)?,
            0,
        );
        let dq1 = self.bn_node_backward(tape, L::H1Dv, &a.q1, &ddv1, g)?;
        let (_, dfp1) = b.rl_divide_backward(a.xd1(), &a.fp1, eps, &dq1, mode)?;
        let mut r = self.unit_backward(tape, L::H1FpConv3, &[&a.a1, &a.a2], &dfp1, &[true, true], g)?;
        let (da1_a, da2) = (take(&mut r, 0), take(&mut r, 1));
        let da1_b = take(
            &mut self.unit_backward(tape, L::H1FpConv2, &[&a.a1], &da2, &[true], g)?,
            0,
        );
        let da1 = self.sum(da1_a, &da1_b)?;
        self.unit_backward(tape, L::H1FpConv1, &[&a.xd], &da1, &[false], g)?;
        Ok(())
    }
}

fn none_vec<V>() -> Vec<Option<V>> {
    (0..NUM_LAYERS).map(|_| None).collect()
}

/// The once-per-step running-statistics update (spec §4), with the optimizer's
/// arithmetic in the backend layer.
pub use crate::backend::optim::update_running_stats;
