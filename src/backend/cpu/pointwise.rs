//! The network's cheap ops: pooling, channel means, the epilogue and its gradient
//! (batch norm in training mode included), the RL division and update nodes, padding.
//! Parallel over channel planes; every reduction sums each plane sequentially and then
//! the planes in order, so results do not depend on the thread count.

use super::{AddendRef, CpuEpilogue, SyncPtr};
use crate::backend::{BnTrainState, ChannelStats, GradMode};
use crate::isa_variants;
use crate::real::Real;
use crate::tensor::{Shape, Tensor};
use rayon::prelude::*;

pub fn avgpool2<T: Real>(x: &Tensor<T>) -> Tensor<T> {
    let s = x.shape;
    assert!(
        s.d.is_multiple_of(2) && s.h.is_multiple_of(2) && s.w.is_multiple_of(2),
        "avgpool2 needs even sizes, got {s}"
    );
    let os = Shape::new(s.n, s.c, s.d / 2, s.h / 2, s.w / 2);
    let mut out = Tensor::zeros(os);
    let eighth = T::of(0.125);
    out.data.par_chunks_mut(os.spatial()).enumerate().for_each(|(p, o)| {
        let src = &x.data[p * s.spatial()..][..s.spatial()];
        for i in 0..os.d {
            for j in 0..os.h {
                for k in 0..os.w {
                    let mut acc = T::zero();
                    for a in 0..2 {
                        for b in 0..2 {
                            let r = ((2 * i + a) * s.h + 2 * j + b) * s.w + 2 * k;
                            acc += src[r] + src[r + 1];
                        }
                    }
                    o[(i * os.h + j) * os.w + k] = acc * eighth;
                }
            }
        }
    });
    out
}

pub fn channel_mean<T: Real>(x: &Tensor<T>) -> Tensor<T> {
    let s = x.shape;
    let mut out = Tensor::zeros(s.with_c(1));
    let inv = T::one() / T::of(s.c as f64);
    out.data.par_chunks_mut(s.spatial()).enumerate().for_each(|(n, o)| {
        for c in 0..s.c {
            for (v, &t) in o.iter_mut().zip(x.plane(n, c)) {
                *v += t;
            }
        }
        o.iter_mut().for_each(|v| *v *= inv);
    });
    out
}

/// ∂L/∂x of channel_mean: dy / C broadcast to every channel.
pub fn channel_mean_backward<T: Real>(dy: &Tensor<T>, channels: usize) -> Tensor<T> {
    let s = dy.shape.with_c(channels);
    let mut out = Tensor::zeros(s);
    let inv = T::one() / T::of(channels as f64);
    out.data.par_chunks_mut(s.spatial()).enumerate().for_each(|(p, o)| {
        let n = p / channels;
        for (v, &g) in o.iter_mut().zip(dy.plane(n, 0)) {
            *v = g * inv;
        }
    });
    out
}

#[inline(always)]
fn epilogue_plane<T: Real, const FMA: bool, const W: usize>(
    z: &[T],
    o: &mut [T],
    sc: T,
    sh: T,
    softplus: bool,
    addend: &AddendRef<'_, T>,
    n: usize,
) {
    match addend {
        AddendRef::SoftplusOf(a) => {
            for ((v, &t), &x) in o.iter_mut().zip(z).zip(a.plane(n, 0)) {
                let h = t * sc + sh;
                *v = if softplus { h.softplus() } else { h } + x.softplus();
            }
        }
        _ => {
            let c = if let AddendRef::Const(c) = addend {
                *c
            } else {
                T::zero()
            };
            if softplus {
                for (v, &t) in o.iter_mut().zip(z) {
                    *v = (t * sc + sh).softplus() + c;
                }
            } else {
                for (v, &t) in o.iter_mut().zip(z) {
                    *v = t * sc + sh + c;
                }
            }
        }
    }
}

isa_variants!(fn epilogue_plane_dispatch<T>(z: &[T], o: &mut [T], sc: T, sh: T, softplus: bool, addend: &AddendRef<'_, T>, n: usize) -> () => epilogue_plane, wide = 16, narrow = 8);

pub fn epilogue<T: Real>(z: &Tensor<T>, epi: &CpuEpilogue<'_, T>) -> Tensor<T> {
    let s = z.shape;
    let mut out = Tensor::zeros(s);
    out.data.par_chunks_mut(s.spatial()).enumerate().for_each(|(p, o)| {
        let (n, c) = (p / s.c, p % s.c);
        epilogue_plane_dispatch(
            z.plane(n, c),
            o,
            epi.scale[c],
            epi.shift[c],
            epi.softplus,
            &epi.addend,
            n,
        );
    });
    out
}

/// Per-channel mean and biased variance, two-pass in f64.
pub fn batch_stats<T: Real>(z: &Tensor<T>) -> ChannelStats {
    let s = z.shape;
    let m = (s.n * s.spatial()) as f64;
    let plane_sums: Vec<f64> = (0..s.n * s.c)
        .into_par_iter()
        .map(|p| z.data[p * s.spatial()..][..s.spatial()].iter().map(|v| v.f64()).sum())
        .collect();
    let mean: Vec<f64> = (0..s.c)
        .map(|c| (0..s.n).map(|n| plane_sums[n * s.c + c]).sum::<f64>() / m)
        .collect();
    let plane_sq: Vec<f64> = (0..s.n * s.c)
        .into_par_iter()
        .map(|p| {
            let mu = mean[p % s.c];
            z.data[p * s.spatial()..][..s.spatial()]
                .iter()
                .map(|v| (v.f64() - mu) * (v.f64() - mu))
                .sum()
        })
        .collect();
    let var = (0..s.c)
        .map(|c| (0..s.n).map(|n| plane_sq[n * s.c + c]).sum::<f64>() / m)
        .collect();
    ChannelStats { mean, var }
}

/// Pass 1 of the epilogue gradient on one plane: writes dh = dy·act'(h) into `o` and
/// returns (Σ dh, Σ dh·x̂). The sums run in 16 independent lanes (so the loop
/// vectorizes; a single running float sum cannot), then in f64.
#[inline(always)]
fn epi_bw_pass1<T: Real, const FMA: bool, const W: usize>(
    z: &[T],
    dy: &[T],
    o: &mut [T],
    softplus: bool,
    gamma: T,
    beta: T,
    mean: T,
    inv_std: T,
) -> (f64, f64) {
    const L: usize = 16;
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for ((ob, zb), gb) in o.chunks_mut(4096).zip(z.chunks(4096)).zip(dy.chunks(4096)) {
        let (mut a1, mut a2) = ([T::zero(); L], [T::zero(); L]);
        let full = zb.len() / L * L;
        for ((oc, zc), gc) in ob[..full]
            .chunks_exact_mut(L)
            .zip(zb[..full].chunks_exact(L))
            .zip(gb[..full].chunks_exact(L))
        {
            for l in 0..L {
                let xh = (zc[l] - mean) * inv_std;
                let dh = if softplus {
                    gc[l] * (gamma * xh + beta).sigmoid()
                } else {
                    gc[l]
                };
                oc[l] = dh;
                a1[l] += dh;
                a2[l] += dh * xh;
            }
        }
        for i in full..zb.len() {
            let xh = (zb[i] - mean) * inv_std;
            let dh = if softplus {
                gb[i] * (gamma * xh + beta).sigmoid()
            } else {
                gb[i]
            };
            ob[i] = dh;
            a1[0] += dh;
            a2[0] += dh * xh;
        }
        s1 += a1.iter().map(|v| v.f64()).sum::<f64>();
        s2 += a2.iter().map(|v| v.f64()).sum::<f64>();
    }
    (s1, s2)
}

isa_variants!(fn epi_bw_pass1_dispatch<T>(z: &[T], dy: &[T], o: &mut [T], softplus: bool, gamma: T, beta: T, mean: T, inv_std: T) -> (f64, f64) => epi_bw_pass1, wide = 16, narrow = 8);

/// Gradient through act(bn(z)) (+ addend) with batch statistics (or no BN). Returns
/// (∂L/∂z, ∂L/∂γ, ∂L/∂β).
pub fn epilogue_backward<T: Real>(
    z: &Tensor<T>,
    dy: &Tensor<T>,
    softplus: bool,
    bn: Option<&BnTrainState<T>>,
) -> (Tensor<T>, Vec<f64>, Vec<f64>) {
    let s = z.shape;
    assert_eq!(s, dy.shape, "epilogue_backward: z and dy differ");
    let mut dz = Tensor::zeros(s);
    let one = T::one();
    let param = |c: usize| match bn {
        Some(b) => (b.gamma[c], b.beta[c], b.mean[c], b.inv_std[c]),
        None => (one, T::zero(), T::zero(), one),
    };
    let sums: Vec<(f64, f64)> = dz
        .data
        .par_chunks_mut(s.spatial())
        .enumerate()
        .map(|(p, o)| {
            let (n, c) = (p / s.c, p % s.c);
            let (g, b, m, is) = param(c);
            epi_bw_pass1_dispatch(z.plane(n, c), dy.plane(n, c), o, softplus, g, b, m, is)
        })
        .collect();
    let dbeta: Vec<f64> = (0..s.c).map(|c| (0..s.n).map(|n| sums[n * s.c + c].0).sum()).collect();
    let dgamma: Vec<f64> = (0..s.c).map(|c| (0..s.n).map(|n| sums[n * s.c + c].1).sum()).collect();
    if let Some(b) = bn {
        // dz = γ·σ⁻¹·(dh − mean(dh) − x̂·mean(dh·x̂))
        let m = (s.n * s.spatial()) as f64;
        dz.data.par_chunks_mut(s.spatial()).enumerate().for_each(|(p, o)| {
            let (n, c) = (p / s.c, p % s.c);
            let k = b.gamma[c] * b.inv_std[c];
            let (mb, mg) = (T::of(dbeta[c] / m), T::of(dgamma[c] / m));
            let (mu, is) = (b.mean[c], b.inv_std[c]);
            for (v, &t) in o.iter_mut().zip(z.plane(n, c)) {
                let xh = (t - mu) * is;
                *v = k * (*v - mb - xh * mg);
            }
        });
        (dz, dgamma, dbeta)
    } else {
        (dz, vec![], vec![])
    }
}

/// q = a / (cm(fp) + eps), a with one channel.
pub fn rl_divide<T: Real>(a: &Tensor<T>, fp: &Tensor<T>, eps: f64) -> Tensor<T> {
    assert_eq!(
        a.shape,
        fp.shape.with_c(1),
        "rl_divide: a {} vs fp {}",
        a.shape,
        fp.shape
    );
    let b = channel_mean(fp);
    let eps = T::of(eps);
    let mut q = Tensor::zeros(a.shape);
    q.data
        .par_chunks_mut(4096)
        .zip(a.data.par_chunks(4096))
        .zip(b.data.par_chunks(4096))
        .for_each(|((q, a), b)| {
            for ((q, &a), &b) in q.iter_mut().zip(a).zip(b) {
                *q = a / (b + eps);
            }
        });
    q
}

/// Spec §5: exact ∂a = dq/(b+ε), ∂b = −q/(b+ε)·dq; paper ∂a = dq, ∂b = −q²·dq;
/// ∂fp = ∂b / C for every channel.
pub fn rl_divide_backward<T: Real>(
    a: &Tensor<T>,
    fp: &Tensor<T>,
    eps: f64,
    dq: &Tensor<T>,
    mode: GradMode,
) -> (Tensor<T>, Tensor<T>) {
    let b = channel_mean(fp);
    let eps = T::of(eps);
    let mut da = Tensor::zeros(a.shape);
    let mut db = Tensor::zeros(a.shape);
    for i in 0..a.data.len() {
        let den = b.data[i] + eps;
        let q = a.data[i] / den;
        let g = dq.data[i];
        match mode {
            GradMode::Exact => {
                da.data[i] = g / den;
                db.data[i] = -q / den * g;
            }
            GradMode::Paper => {
                da.data[i] = g;
                db.data[i] = -q * q * g;
            }
        }
    }
    (da, channel_mean_backward(&db, fp.shape.c))
}

/// e = a · cm(bp), a with one channel.
pub fn rl_update<T: Real>(a: &Tensor<T>, bp: &Tensor<T>) -> Tensor<T> {
    assert_eq!(
        a.shape,
        bp.shape.with_c(1),
        "rl_update: a {} vs bp {}",
        a.shape,
        bp.shape
    );
    let mut e = channel_mean(bp);
    for (e, &a) in e.data.iter_mut().zip(&a.data) {
        *e *= a;
    }
    e
}

/// Spec §5: ∂bp = a·de / C (both modes); ∂a = cm(bp)·de (exact) or de (paper).
pub fn rl_update_backward<T: Real>(
    a: &Tensor<T>,
    bp: &Tensor<T>,
    de: &Tensor<T>,
    mode: GradMode,
) -> (Tensor<T>, Tensor<T>) {
    let m = channel_mean(bp);
    let da = match mode {
        GradMode::Exact => Tensor {
            shape: a.shape,
            data: m.data.iter().zip(&de.data).map(|(&m, &g)| m * g).collect(),
        },
        GradMode::Paper => de.clone(),
    };
    let dm = Tensor {
        shape: a.shape,
        data: a.data.iter().zip(&de.data).map(|(&a, &g)| a * g).collect(),
    };
    (da, channel_mean_backward(&dm, bp.shape.c))
}

pub fn accumulate<T: Real>(acc: &mut Tensor<T>, t: &Tensor<T>) {
    assert_eq!(acc.shape, t.shape, "accumulate: shapes differ");
    acc.data
        .par_chunks_mut(4096)
        .zip(t.data.par_chunks(4096))
        .for_each(|(a, b)| {
            for (a, &b) in a.iter_mut().zip(b) {
                *a += b;
            }
        });
}

/// Index of the source voxel for position i of a dimension of size n mirror-padded
/// (symmetric: ... 1 0 | 0 1 ... n-1 | n-1 n-2 ...).
fn mirror(i: usize, n: usize) -> usize {
    if i < n {
        i
    } else {
        2 * n - 1 - i
    }
}

pub fn pad_even<T: Real>(x: &Tensor<T>) -> Tensor<T> {
    let s = x.shape;
    let e = |v: usize| v + v % 2;
    let os = Shape::new(s.n, s.c, e(s.d), e(s.h), e(s.w));
    if os == s {
        return x.clone();
    }
    let mut out = Tensor::zeros(os);
    out.data.par_chunks_mut(os.spatial()).enumerate().for_each(|(p, o)| {
        let src = &x.data[p * s.spatial()..][..s.spatial()];
        for d in 0..os.d {
            for h in 0..os.h {
                let r = (mirror(d, s.d) * s.h + mirror(h, s.h)) * s.w;
                for w in 0..os.w {
                    o[(d * os.h + h) * os.w + w] = src[r + mirror(w, s.w)];
                }
            }
        }
    });
    out
}

pub fn crop<T: Real>(x: &Tensor<T>, shape: Shape) -> Tensor<T> {
    let s = x.shape;
    assert!(shape.n == s.n && shape.c == s.c && shape.d <= s.d && shape.h <= s.h && shape.w <= s.w);
    if shape == s {
        return x.clone();
    }
    let mut out = Tensor::zeros(shape);
    out.data.par_chunks_mut(shape.spatial()).enumerate().for_each(|(p, o)| {
        let src = &x.data[p * s.spatial()..][..s.spatial()];
        for d in 0..shape.d {
            for h in 0..shape.h {
                o[(d * shape.h + h) * shape.w..][..shape.w].copy_from_slice(&src[(d * s.h + h) * s.w..][..shape.w]);
            }
        }
    });
    out
}

pub fn uncrop_zeros<T: Real>(x: &Tensor<T>, shape: Shape) -> Tensor<T> {
    let s = x.shape;
    if shape == s {
        return x.clone();
    }
    let mut out = Tensor::zeros(shape);
    let ptr = SyncPtr::new(&mut out.data);
    (0..s.n * s.c).into_par_iter().for_each(|p| {
        let src = &x.data[p * s.spatial()..][..s.spatial()];
        for d in 0..s.d {
            for h in 0..s.h {
                // SAFETY: plane p is written by this task alone.
                unsafe {
                    ptr.write_slice(
                        p * shape.spatial() + (d * shape.h + h) * shape.w,
                        &src[(d * s.h + h) * s.w..][..s.w],
                    )
                };
            }
        }
    });
    out
}
