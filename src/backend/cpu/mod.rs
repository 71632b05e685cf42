//! The CPU backend: the reference implementation (the oracle) of every op, generic over
//! f32 (speed) and f64 (gradient checks), parallel with rayon.

pub mod conv3;
pub mod pointwise;
pub mod simd;
pub mod up2;

pub use simd::{isa, CpuReal, Isa};

use super::loss::{loss_and_grad, LossTerms};
use super::optim::{update_running_stats, Adam};
use super::{Addend, Backend, BnTrainState, ChannelStats, Epilogue, GradMode};
use crate::error::{Error, Result};
use crate::model::{Model, Params, Variant};
use crate::real::Real;
use crate::tensor::{Shape, Tensor};
use std::marker::PhantomData;

/// An addend as the CPU kernels see it.
pub type AddendRef<'a, T> = Addend<'a, Tensor<T>, T>;

impl<X, T: Copy> Clone for Addend<'_, X, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<X, T: Copy> Copy for Addend<'_, X, T> {}

/// An [`Epilogue`] with scale and shift filled in for every channel.
pub struct CpuEpilogue<'a, T> {
    pub scale: Vec<T>,
    pub shift: Vec<T>,
    pub softplus: bool,
    pub addend: AddendRef<'a, T>,
}

impl<'a, T: Real> CpuEpilogue<'a, T> {
    pub fn identity(channels: usize) -> Self {
        CpuEpilogue {
            scale: vec![T::one(); channels],
            shift: vec![T::zero(); channels],
            softplus: false,
            addend: Addend::None,
        }
    }
    fn from(epi: &Epilogue<'a, Tensor<T>, T>, channels: usize) -> Self {
        let fill = |v: &[T], d: T| if v.is_empty() { vec![d; channels] } else { v.to_vec() };
        assert!(
            epi.scale.is_empty() || epi.scale.len() == channels,
            "epilogue has {} scales for {channels} channels",
            epi.scale.len()
        );
        CpuEpilogue {
            scale: fill(epi.scale, T::one()),
            shift: fill(epi.shift, T::zero()),
            softplus: epi.softplus,
            addend: epi.addend,
        }
    }
}

/// A raw pointer for parallel tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T> {
    ptr: *mut T,
    len: usize,
}
// SAFETY: users guarantee that concurrent writes go to disjoint ranges.
unsafe impl<T: Send> Send for SyncPtr<T> {}
unsafe impl<T: Send> Sync for SyncPtr<T> {}

impl<T: Copy> SyncPtr<T> {
    pub fn new(v: &mut [T]) -> Self {
        SyncPtr {
            ptr: v.as_mut_ptr(),
            len: v.len(),
        }
    }
    /// # Safety
    /// No other thread may access `off..off + src.len()` concurrently.
    #[inline(always)]
    pub unsafe fn write_slice(&self, off: usize, src: &[T]) {
        assert!(off + src.len() <= self.len, "SyncPtr write out of bounds");
        std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len());
    }
}

/// The CPU backend for scalar type `T`. It has no state: the thread count is rayon's
/// (see [`crate::set_threads`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend<T>(PhantomData<T>);

impl<T: CpuReal> CpuBackend<T> {
    pub fn new() -> Self {
        CpuBackend(PhantomData)
    }
    /// The same as [`CpuBackend::new`], usable in constants.
    pub const fn new_const() -> Self {
        CpuBackend(PhantomData)
    }
}

impl<T: CpuReal> Backend for CpuBackend<T> {
    type T = T;
    type X = Tensor<T>;
    type Grads = Params<f64>;
    /// Adam itself: the weights and running statistics are the host model.
    type Opt = Adam;

    fn shape(&self, x: &Tensor<T>) -> Shape {
        x.shape
    }
    fn from_host(&self, t: &Tensor<T>) -> Result<Tensor<T>> {
        Ok(t.clone())
    }
    fn to_host(&self, x: &Tensor<T>) -> Result<Tensor<T>> {
        Ok(x.clone())
    }
    fn conv3(
        &self,
        inputs: &[&Tensor<T>],
        weight: &[T],
        c_out: usize,
        epi: &Epilogue<'_, Tensor<T>, T>,
    ) -> Result<Tensor<T>> {
        Ok(conv3::conv3_forward(
            inputs,
            weight,
            c_out,
            &CpuEpilogue::from(epi, c_out),
        ))
    }
    fn up2(&self, x: &Tensor<T>, weight: &[T], c_out: usize, epi: &Epilogue<'_, Tensor<T>, T>) -> Result<Tensor<T>> {
        Ok(up2::up2_forward(x, weight, c_out, &CpuEpilogue::from(epi, c_out)))
    }
    fn epilogue(&self, z: &Tensor<T>, epi: &Epilogue<'_, Tensor<T>, T>) -> Result<Tensor<T>> {
        Ok(pointwise::epilogue(z, &CpuEpilogue::from(epi, z.shape.c)))
    }
    fn avgpool2(&self, x: &Tensor<T>) -> Result<Tensor<T>> {
        Ok(pointwise::avgpool2(x))
    }
    fn channel_mean(&self, x: &Tensor<T>) -> Result<Tensor<T>> {
        Ok(pointwise::channel_mean(x))
    }
    fn batch_stats(&self, z: &Tensor<T>) -> Result<ChannelStats> {
        Ok(pointwise::batch_stats(z))
    }
    fn rl_divide(&self, a: &Tensor<T>, fp: &Tensor<T>, eps: f64) -> Result<Tensor<T>> {
        Ok(pointwise::rl_divide(a, fp, eps))
    }
    fn rl_update(&self, a: &Tensor<T>, bp: &Tensor<T>) -> Result<Tensor<T>> {
        Ok(pointwise::rl_update(a, bp))
    }
    fn loss(
        &self,
        y: &Tensor<T>,
        e1r: &Tensor<T>,
        x1: &Tensor<T>,
        g: &Tensor<T>,
    ) -> Result<(LossTerms, Tensor<T>, Tensor<T>)> {
        if !(y.shape == g.shape && e1r.shape == g.shape && x1.shape == g.shape) {
            return Err(Error::Shape(format!(
                "loss: prediction {}, E1r {}, input {} and ground truth {} must have one shape",
                y.shape, e1r.shape, x1.shape, g.shape
            )));
        }
        let (terms, dy, de) = loss_and_grad(&y.data, &e1r.data, &x1.data, &g.data);
        let grad = |data| Tensor { shape: y.shape, data };
        Ok((terms, grad(dy), grad(de)))
    }
    fn epilogue_backward(
        &self,
        z: &Tensor<T>,
        dy: &Tensor<T>,
        softplus: bool,
        bn: Option<&BnTrainState<T>>,
    ) -> Result<(Tensor<T>, Vec<f64>, Vec<f64>)> {
        Ok(pointwise::epilogue_backward(z, dy, softplus, bn))
    }
    fn conv3_backward_data(
        &self,
        dz: &Tensor<T>,
        weight: &[T],
        c_in: &[usize],
        needed: &[bool],
    ) -> Result<Vec<Option<Tensor<T>>>> {
        Ok(conv3::conv3_backward_data(dz, weight, c_in, needed))
    }
    fn conv3_backward_weight(&self, inputs: &[&Tensor<T>], dz: &Tensor<T>) -> Result<Vec<f64>> {
        Ok(conv3::conv3_backward_weight(inputs, dz))
    }
    fn up2_backward_data(&self, dz: &Tensor<T>, weight: &[T], c_in: usize) -> Result<Tensor<T>> {
        Ok(up2::up2_backward_data(dz, weight, c_in))
    }
    fn up2_backward_weight(&self, x: &Tensor<T>, dz: &Tensor<T>) -> Result<Vec<f64>> {
        Ok(up2::up2_backward_weight(x, dz))
    }
    fn rl_divide_backward(
        &self,
        a: &Tensor<T>,
        fp: &Tensor<T>,
        eps: f64,
        dq: &Tensor<T>,
        mode: GradMode,
    ) -> Result<(Tensor<T>, Tensor<T>)> {
        Ok(pointwise::rl_divide_backward(a, fp, eps, dq, mode))
    }
    fn rl_update_backward(
        &self,
        a: &Tensor<T>,
        bp: &Tensor<T>,
        de: &Tensor<T>,
        mode: GradMode,
    ) -> Result<(Tensor<T>, Tensor<T>)> {
        Ok(pointwise::rl_update_backward(a, bp, de, mode))
    }
    fn channel_mean_backward(&self, dy: &Tensor<T>, channels: usize) -> Result<Tensor<T>> {
        Ok(pointwise::channel_mean_backward(dy, channels))
    }
    fn accumulate(&self, acc: &mut Tensor<T>, t: &Tensor<T>) -> Result<()> {
        pointwise::accumulate(acc, t);
        Ok(())
    }
    fn pad_even(&self, x: &Tensor<T>) -> Result<Tensor<T>> {
        Ok(pointwise::pad_even(x))
    }
    fn crop(&self, x: &Tensor<T>, shape: Shape) -> Result<Tensor<T>> {
        Ok(pointwise::crop(x, shape))
    }
    fn uncrop_zeros(&self, x: &Tensor<T>, shape: Shape) -> Result<Tensor<T>> {
        Ok(pointwise::uncrop_zeros(x, shape))
    }
    fn grads_new(&self, variant: Variant) -> Result<Params<f64>> {
        Ok(Params::zeros(variant))
    }
    fn opt_new(&self, _model: &Model<T>, adam: &Adam) -> Result<Adam> {
        Ok(adam.clone())
    }
    /// The host arithmetic of the trainer: [`Adam::update`] in f64, then
    /// [`update_running_stats`].
    fn opt_step(
        &self,
        adam: &mut Adam,
        grads: &Params<f64>,
        stats: &[Option<ChannelStats>],
        model: &mut Model<T>,
    ) -> Result<bool> {
        if !grads.all_finite() {
            return Ok(false);
        }
        adam.update(&mut model.params, grads);
        update_running_stats(model, stats);
        Ok(true)
    }
    fn opt_download(&self, adam: &Adam, _model: &mut Model<T>) -> Result<Adam> {
        Ok(adam.clone())
    }
}
