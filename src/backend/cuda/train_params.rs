//! The CUDA training backend's resident state (issue 16, item 1): the FP32 master weights,
//! Adam's moments (f64) and step counter, and the batch-norm running statistics live on
//! the device; a backward pass reduces every parameter gradient straight into one device
//! buffer ([`DevGrads`]); one optimizer step is three launches of kernels/train_adam.cu
//! (`t_grad_check`, `t_adam`, `t_running_stats`) and one download of the new weights and
//! statistics (64 KB) into the host mirror that the ops' weight slices come from.
//!
//! Precision: the moments stay f64 and every kernel operation is an explicitly rounded
//! f64 intrinsic in the host's order, so given the same gradients a device step equals
//! [`Adam::update`] + [`crate::backend::optim::update_running_stats`] bit for bit (tested on the
//! emulation; f32 moments would save 128 KB and nothing measurable, and would make
//! checkpoints differ between the CPU and the GPU). lr_t is computed on the host by
//! [`crate::backend::optim::lr_t`] and passed as a kernel argument.

use super::*;
use crate::backend::optim::{lr_t, LrSchedule, BETA1, BETA2, EPSILON};
use crate::backend::GradSink;
use crate::model::{ParamKind, Params, RunningStats};

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
    /// Steps taken (t of the next step), as Adam counts them.
    step: u64,
    schedule: LrSchedule,
}

impl DevOpt {
    fn state_len(&self) -> usize {
        self.layout.params + self.layout.running + 1
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
        Ok(DevOpt {
            layout,
            state: s,
            moments: mv,
            step: adam.step,
            schedule: adam.schedule,
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
        // the batch statistics in the running-statistics layout (the host has them: the
        // forward pass's epilogue needed them)
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
        let batch_dev = self.alloc(batch.len() * 8)?;
        self.rt.htod(batch_dev.ptr(), &batch)?;
        let status = opt.state.ptr() + 4 * (lay.params + lay.running) as u64;

        let mut args = TrainArgs::default();
        args.part = grads.mem.ptr();
        args.out[0] = status;
        args.count = lay.params as i64;
        self.launch("t_grad_check", (1, 1, 1), 0, &args)?;

        let mut args = TrainArgs::default();
        args.inp[0] = status;
        args.part = grads.mem.ptr();
        args.stat = opt.moments.ptr();
        args.out[0] = opt.state.ptr();
        args.dc[..6].copy_from_slice(&[
            lr_t(&opt.schedule, opt.step),
            BETA1,
            BETA2,
            EPSILON,
            1.0 - BETA1,
            1.0 - BETA2,
        ]);
        self.launch_1d("t_adam", lay.params, args)?;

        let m = model.config.bn_momentum;
        let mut args = TrainArgs::default();
        args.inp[0] = status;
        args.part = batch_dev.ptr();
        args.out[0] = opt.state.ptr() + 4 * lay.params as u64;
        args.dc[0] = m;
        args.dc[1] = 1.0 - m;
        self.launch_1d("t_running_stats", lay.running, args)?;

        // the one synchronization of the optimizer: the host mirror of the new weights
        let state = self.download_state(opt)?;
        if state[state.len() - 1] != 1.0 {
            return Ok(false);
        }
        Self::mirror(opt, &state, model);
        opt.step += 1;
        Ok(true)
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
