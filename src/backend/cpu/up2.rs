//! 2×2×2 transposed convolution with stride 2 (spec §3 `up2`), forward and gradients.
//! out[2i+a, 2j+b, 2k+c, o] = Σ_in t[i, j, k, in] · W[in, o, a, b, c].
//! It is about 1% of the network's arithmetic, so the loops are plain.

use super::{AddendRef, CpuEpilogue, SyncPtr};
use crate::isa_variants;
use crate::real::Real;
use crate::tensor::{Shape, Tensor};
use rayon::prelude::*;

struct Up2Ctx<'a, T> {
    x: &'a Tensor<T>,
    weight: &'a [T],
    c_out: usize,
    epi: &'a CpuEpilogue<'a, T>,
    out: SyncPtr<T>,
    os: Shape,
}

/// One output plane (n, od) of up2 with its epilogue.
#[inline(always)]
fn up2_task<T: Real, const FMA: bool, const W: usize>(c: &Up2Ctx<'_, T>, t: usize) {
    let (s, os) = (c.x.shape, c.os);
    let (n, od) = (t / os.d, t % os.d);
    let (i, a) = (od / 2, od % 2);
    let mut even = vec![T::zero(); s.w];
    let mut odd = vec![T::zero(); s.w];
    let mut row = vec![T::zero(); os.w];
    for oh in 0..os.h {
        let (j, b) = (oh / 2, oh % 2);
        for o in 0..c.c_out {
            even.iter_mut().for_each(|v| *v = T::zero());
            odd.iter_mut().for_each(|v| *v = T::zero());
            for c_in in 0..s.c {
                let src = &c.x.plane(n, c_in)[(i * s.h + j) * s.w..][..s.w];
                let w0 = c.weight[((c_in * c.c_out + o) * 2 + a) * 4 + b * 2];
                let w1 = c.weight[((c_in * c.c_out + o) * 2 + a) * 4 + b * 2 + 1];
                for k in 0..s.w {
                    even[k] += src[k] * w0;
                    odd[k] += src[k] * w1;
                }
            }
            let (sc, sh) = (c.epi.scale[o], c.epi.shift[o]);
            for v in even.iter_mut().chain(odd.iter_mut()) {
                *v = *v * sc + sh;
            }
            if c.epi.softplus {
                for v in even.iter_mut().chain(odd.iter_mut()) {
                    *v = v.softplus();
                }
            }
            for k in 0..s.w {
                row[2 * k] = even[k];
                row[2 * k + 1] = odd[k];
            }
            match c.epi.addend {
                AddendRef::None => {}
                AddendRef::Const(v) => row.iter_mut().for_each(|r| *r += v),
                AddendRef::SoftplusOf(ad) => {
                    let arow = &ad.plane(n, 0)[(od * os.h + oh) * os.w..][..os.w];
                    for (r, &v) in row.iter_mut().zip(arow) {
                        *r += v.softplus();
                    }
                }
            }
            // SAFETY: plane (n, o), row (od, oh) belongs to this task alone.
            unsafe { c.out.write_slice(os.plane(n, o) + (od * os.h + oh) * os.w, &row) };
        }
    }
}

isa_variants!(fn up2_task_dispatch<T>(c: &Up2Ctx<'_, T>, t: usize) -> () => up2_task, wide = 16, narrow = 8);

pub fn up2_forward<T: Real>(x: &Tensor<T>, weight: &[T], c_out: usize, epi: &CpuEpilogue<'_, T>) -> Tensor<T> {
    let s = x.shape;
    assert_eq!(weight.len(), s.c * c_out * 8);
    let os = Shape::new(s.n, c_out, 2 * s.d, 2 * s.h, 2 * s.w);
    let mut out = Tensor::<T>::zeros(os);
    let ctx = Up2Ctx {
        x,
        weight,
        c_out,
        epi,
        out: SyncPtr::new(&mut out.data),
        os,
    };
    (0..s.n * os.d).into_par_iter().for_each(|t| up2_task_dispatch(&ctx, t));
    out
}

/// ∂L/∂t[in, i, j, k] = Σ_{o,a,b,c} dz[o, 2i+a, 2j+b, 2k+c] · W[in, o, a, b, c].
pub fn up2_backward_data<T: Real>(dz: &Tensor<T>, weight: &[T], c_in: usize) -> Tensor<T> {
    let os = dz.shape;
    let c_out = os.c;
    let s = Shape::new(os.n, c_in, os.d / 2, os.h / 2, os.w / 2);
    let mut dx = Tensor::<T>::zeros(s);
    let ptr = SyncPtr::new(&mut dx.data);
    (0..s.n * s.d).into_par_iter().for_each(|t| {
        let (n, i) = (t / s.d, t % s.d);
        let mut row = vec![T::zero(); s.w];
        for ci in 0..c_in {
            for j in 0..s.h {
                row.iter_mut().for_each(|v| *v = T::zero());
                for o in 0..c_out {
                    for a in 0..2 {
                        for b in 0..2 {
                            let src = &dz.plane(n, o)[((2 * i + a) * os.h + 2 * j + b) * os.w..][..os.w];
                            let w0 = weight[((ci * c_out + o) * 2 + a) * 4 + b * 2];
                            let w1 = weight[((ci * c_out + o) * 2 + a) * 4 + b * 2 + 1];
                            for k in 0..s.w {
                                row[k] += src[2 * k] * w0 + src[2 * k + 1] * w1;
                            }
                        }
                    }
                }
                // SAFETY: plane (n, ci), row (i, j) belongs to this task alone.
                unsafe { ptr.write_slice(s.plane(n, ci) + (i * s.h + j) * s.w, &row) };
            }
        }
    });
    dx
}

/// ∂L/∂W[in, o, a, b, c] = Σ t[in, i, j, k] · dz[o, 2i+a, 2j+b, 2k+c], summed in f64 in a
/// fixed order.
pub fn up2_backward_weight<T: Real>(x: &Tensor<T>, dz: &Tensor<T>) -> Vec<f64> {
    let s = x.shape;
    let os = dz.shape;
    let (ci, co) = (s.c, os.c);
    let tasks = s.n * s.d;
    let groups = super::conv3::REDUCTION_GROUPS.min(tasks);
    let partials: Vec<Vec<f64>> = (0..groups)
        .into_par_iter()
        .map(|g| {
            let mut dw = vec![0.0f64; ci * co * 8];
            for t in (g * tasks / groups)..((g + 1) * tasks / groups) {
                let (n, i) = (t / s.d, t % s.d);
                for c_in in 0..ci {
                    for o in 0..co {
                        for a in 0..2 {
                            for b in 0..2 {
                                let (mut s0, mut s1) = (T::zero(), T::zero());
                                for j in 0..s.h {
                                    let src = &x.plane(n, c_in)[(i * s.h + j) * s.w..][..s.w];
                                    let d = &dz.plane(n, o)[((2 * i + a) * os.h + 2 * j + b) * os.w..][..os.w];
                                    for k in 0..s.w {
                                        s0 += src[k] * d[2 * k];
                                        s1 += src[k] * d[2 * k + 1];
                                    }
                                }
                                let base = ((c_in * co + o) * 2 + a) * 4 + b * 2;
                                dw[base] += s0.f64();
                                dw[base + 1] += s1.f64();
                            }
                        }
                    }
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0.0; ci * co * 8];
    for p in partials {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    dw
}
