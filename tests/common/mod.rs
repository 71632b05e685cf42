//! Shared test helpers: random models and volumes, and a naive implementation of the
//! network (spec §3 as plain loops over NCDHW f64 tensors), the second check the
//! optimized CPU backend is compared with.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rln_engine::model::{LayerOp, Model, ModelConfig, Variant, L, LAYERS};
use rln_engine::real::Real;
use rln_engine::tensor::{Shape, Tensor};

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A model with random conv weights (scaled so activations stay moderate), random BN
/// parameters and running statistics.
pub fn random_model(seed: u64, variant: Variant) -> Model<f64> {
    let config = ModelConfig {
        variant,
        div_eps: 1e-3,
        ..ModelConfig::default()
    };
    let mut m = Model::<f64>::init(config, seed);
    let mut r = rng(seed ^ 0x5eed);
    for (l, spec) in LAYERS.iter().enumerate() {
        let fan_in = match spec.op {
            LayerOp::Conv3 => spec.c_in_for(variant.input_channels()) as f64 * 27.0,
            LayerOp::Up2 => spec.c_in as f64,
            LayerOp::BnOnly => 1.0,
        };
        for w in m.params.layers[l].weight.iter_mut() {
            *w = r.random_range(-1.0..1.0) * 1.7 / fan_in.sqrt();
        }
        for g in m.params.layers[l].gamma.iter_mut() {
            *g = r.random_range(0.5..1.5);
        }
        for b in m.params.layers[l].beta.iter_mut() {
            *b = r.random_range(-0.5..0.5);
        }
        for v in m.running.mean[l].iter_mut() {
            *v = r.random_range(-0.5..0.5);
        }
        for v in m.running.var[l].iter_mut() {
            *v = r.random_range(0.5..2.0);
        }
    }
    m
}

/// A positive random volume batch (like normalized microscopy data, with structure).
pub fn random_volume<T: Real>(seed: u64, shape: Shape) -> Tensor<T> {
    let mut r = rng(seed);
    let data = (0..shape.len())
        .map(|_| T::of(r.random_range(0.0..1.0f64).powi(2) * 1.5))
        .collect();
    Tensor::from_vec(shape, data).unwrap()
}

// ---------------------------------------------------------------- naive network

type T4 = Tensor<f64>;

fn at(t: &T4, n: usize, c: usize, d: isize, h: isize, w: isize) -> f64 {
    let s = t.shape;
    if d < 0 || h < 0 || w < 0 || d >= s.d as isize || h >= s.h as isize || w >= s.w as isize {
        return 0.0;
    }
    t.data[((((n * s.c + c) * s.d) + d as usize) * s.h + h as usize) * s.w + w as usize]
}

fn idx(s: Shape, n: usize, c: usize, d: usize, h: usize, w: usize) -> usize {
    (((n * s.c + c) * s.d + d) * s.h + h) * s.w + w
}

pub fn naive_cat(ts: &[&T4]) -> T4 {
    let s = ts[0].shape;
    let c: usize = ts.iter().map(|t| t.shape.c).sum();
    let os = s.with_c(c);
    let mut out = T4::zeros(os);
    for n in 0..s.n {
        let mut co = 0;
        for t in ts {
            for ci in 0..t.shape.c {
                out.plane_mut(n, co).copy_from_slice(t.plane(n, ci));
                co += 1;
            }
        }
    }
    out
}

/// conv3 with weight [co][ci][3][3][3], zero padding 1.
pub fn naive_conv3(x: &T4, w: &[f64], co: usize) -> T4 {
    let s = x.shape;
    let os = s.with_c(co);
    let mut out = T4::zeros(os);
    for n in 0..s.n {
        for o in 0..co {
            for d in 0..s.d {
                for h in 0..s.h {
                    for x_ in 0..s.w {
                        let mut acc = 0.0;
                        for i in 0..s.c {
                            for k in 0..27 {
                                let (a, b, c) = (k / 9, (k / 3) % 3, k % 3);
                                acc += w[(o * s.c + i) * 27 + k]
                                    * at(
                                        x,
                                        n,
                                        i,
                                        d as isize + a as isize - 1,
                                        h as isize + b as isize - 1,
                                        x_ as isize + c as isize - 1,
                                    );
                            }
                        }
                        out.data[idx(os, n, o, d, h, x_)] = acc;
                    }
                }
            }
        }
    }
    out
}

/// 2×2×2 stride-2 transposed conv, weight [ci][co][2][2][2].
pub fn naive_up2(x: &T4, w: &[f64], co: usize) -> T4 {
    let s = x.shape;
    let os = Shape::new(s.n, co, 2 * s.d, 2 * s.h, 2 * s.w);
    let mut out = T4::zeros(os);
    for n in 0..s.n {
        for o in 0..co {
            for d in 0..os.d {
                for h in 0..os.h {
                    for x_ in 0..os.w {
                        let mut acc = 0.0;
                        for i in 0..s.c {
                            let k = (d % 2) * 4 + (h % 2) * 2 + x_ % 2;
                            acc += w[(i * co + o) * 8 + k]
                                * at(x, n, i, (d / 2) as isize, (h / 2) as isize, (x_ / 2) as isize);
                        }
                        out.data[idx(os, n, o, d, h, x_)] = acc;
                    }
                }
            }
        }
    }
    out
}

pub fn naive_pool(x: &T4) -> T4 {
    let s = x.shape;
    let os = Shape::new(s.n, s.c, s.d / 2, s.h / 2, s.w / 2);
    let mut out = T4::zeros(os);
    for n in 0..s.n {
        for c in 0..s.c {
            for d in 0..os.d {
                for h in 0..os.h {
                    for w in 0..os.w {
                        let mut acc = 0.0;
                        for k in 0..8 {
                            acc += at(
                                x,
                                n,
                                c,
                                (2 * d + k / 4) as isize,
                                (2 * h + (k / 2) % 2) as isize,
                                (2 * w + k % 2) as isize,
                            );
                        }
                        out.data[idx(os, n, c, d, h, w)] = acc / 8.0;
                    }
                }
            }
        }
    }
    out
}

pub fn naive_cm(x: &T4) -> T4 {
    let s = x.shape;
    let mut out = T4::zeros(s.with_c(1));
    for n in 0..s.n {
        for v in 0..s.spatial() {
            out.data[n * s.spatial() + v] = (0..s.c).map(|c| x.plane(n, c)[v]).sum::<f64>() / s.c as f64;
        }
    }
    out
}

fn map(x: &T4, f: impl Fn(f64) -> f64) -> T4 {
    T4 {
        shape: x.shape,
        data: x.data.iter().map(|&v| f(v)).collect(),
    }
}

/// x (1 channel) broadcast-combined with t (C channels).
fn bcast(t: &T4, one: &T4, f: impl Fn(f64, f64) -> f64) -> T4 {
    let s = t.shape;
    let mut out = t.clone();
    for n in 0..s.n {
        for c in 0..s.c {
            for v in 0..s.spatial() {
                out.data[(n * s.c + c) * s.spatial() + v] = f(t.plane(n, c)[v], one.plane(n, 0)[v]);
            }
        }
    }
    out
}

fn sp(v: f64) -> f64 {
    v.softplus()
}

pub struct NaiveOut {
    pub y: T4,
    pub e1r: T4,
    pub e2r: T4,
}

/// Symmetric mirror padding to even sizes (the engine's rule).
pub fn naive_pad_even(x: &T4) -> T4 {
    let s = x.shape;
    let e = |v: usize| v + v % 2;
    let os = Shape::new(s.n, s.c, e(s.d), e(s.h), e(s.w));
    let m = |i: usize, n: usize| if i < n { i } else { 2 * n - 1 - i };
    let mut out = T4::zeros(os);
    for n in 0..s.n {
        for c in 0..s.c {
            for d in 0..os.d {
                for h in 0..os.h {
                    for w in 0..os.w {
                        out.data[idx(os, n, c, d, h, w)] = x.data[idx(s, n, c, m(d, s.d), m(h, s.h), m(w, s.w))];
                    }
                }
            }
        }
    }
    out
}

pub fn naive_crop(x: &T4, s: Shape) -> T4 {
    let mut out = T4::zeros(s);
    for n in 0..s.n {
        for c in 0..s.c {
            for d in 0..s.d {
                for h in 0..s.h {
                    for w in 0..s.w {
                        out.data[idx(s, n, c, d, h, w)] = x.data[idx(x.shape, n, c, d, h, w)];
                    }
                }
            }
        }
    }
    out
}

/// The forward pass of spec §3, as literally as possible. `batch_stats`: BN with batch
/// statistics (training) instead of running statistics.
pub fn naive_forward(m: &Model<f64>, x_in: &T4, batch_stats: bool) -> NaiveOut {
    let eps_bn = m.config.bn_eps;
    let bn = |t: &T4, l: L| -> T4 {
        let i = l as usize;
        let s = t.shape;
        let mut out = t.clone();
        for c in 0..s.c {
            let vals: Vec<f64> = (0..s.n).flat_map(|n| t.plane(n, c).to_vec()).collect();
            let (mean, var) = if batch_stats {
                let mu = vals.iter().sum::<f64>() / vals.len() as f64;
                (
                    mu,
                    vals.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / vals.len() as f64,
                )
            } else {
                (m.running.mean[i][c], m.running.var[i][c])
            };
            let (g, b) = (m.params.layers[i].gamma[c], m.params.layers[i].beta[c]);
            for n in 0..s.n {
                for v in out.plane_mut(n, c) {
                    *v = (*v - mean) / (var + eps_bn).sqrt() * g + b;
                }
            }
        }
        out
    };
    let w = |l: L| &m.params.layers[l as usize].weight[..];
    let conv = |ts: &[&T4], l: L| naive_conv3(&naive_cat(ts), w(l), l.spec().c_out);
    let spm = |t: &T4| map(t, sp);
    let div_eps = m.config.div_eps;

    let x = naive_pad_even(x_in);
    let x1 = if x.shape.c > 1 { naive_cm(&x) } else { x.clone() };
    let xd = naive_pool(&x);
    let xd1 = naive_pool(&x1);
    let a1 = spm(&bn(&conv(&[&xd], L::H1FpConv1), L::H1FpConv1));
    let a2 = spm(&bn(&conv(&[&a1], L::H1FpConv2), L::H1FpConv2));
    let fp1 = bcast(
        &spm(&bn(&conv(&[&a1, &a2], L::H1FpConv3), L::H1FpConv3)),
        &xd1,
        |t, o| t + sp(o),
    );
    let cm1 = naive_cm(&fp1);
    let dv1 = bn(
        &T4 {
            shape: xd1.shape,
            data: xd1.data.iter().zip(&cm1.data).map(|(a, b)| a / (b + div_eps)).collect(),
        },
        L::H1Dv,
    );
    let b1 = spm(&bn(&conv(&[&dv1], L::H1BpConv1), L::H1BpConv1));
    let b2 = spm(&bn(&conv(&[&b1], L::H1BpConv2), L::H1BpConv2));
    let b3 = spm(&bn(&conv(&[&b2, &b1], L::H1BpConv3), L::H1BpConv3));
    let u = spm(&bn(&naive_up2(&b3, w(L::H1BpUp), 4), L::H1BpUp));
    let bp1 = spm(&bn(&conv(&[&u], L::H1BpConv4), L::H1BpConv4));
    let cmb1 = naive_cm(&bp1);
    let e1r = T4 {
        shape: x1.shape,
        data: x1.data.iter().zip(&cmb1.data).map(|(a, b)| a * b).collect(),
    };
    let e1 = spm(&bn(&e1r, L::H1E));
    let c1 = spm(&bn(&conv(&[&x], L::H2FpConv1), L::H2FpConv1));
    let fp2 = bcast(&spm(&bn(&conv(&[&c1], L::H2FpConv2), L::H2FpConv2)), &x1, |t, o| {
        t + sp(o)
    });
    let cm2 = naive_cm(&fp2);
    let dv2 = bn(
        &T4 {
            shape: x1.shape,
            data: x1.data.iter().zip(&cm2.data).map(|(a, b)| a / (b + div_eps)).collect(),
        },
        L::H2Dv,
    );
    let d1 = spm(&bn(&conv(&[&dv2], L::H2BpConv1), L::H2BpConv1));
    let bp2 = map(&spm(&bn(&conv(&[&d1], L::H2BpConv2), L::H2BpConv2)), |v| v + 1.0);
    let cmb2 = naive_cm(&bp2);
    let e2r = T4 {
        shape: e1.shape,
        data: e1.data.iter().zip(&cmb2.data).map(|(a, b)| a * b).collect(),
    };
    let e2 = spm(&bn(&e2r, L::H2E));
    let f1 = spm(&conv(&[&e2], L::H3Conv1));
    let f2 = spm(&conv(&[&f1, &e2, &e1], L::H3Conv2));
    let f3 = spm(&bn(&conv(&[&f1, &f2], L::H3Conv3), L::H3Conv3));
    let y = naive_cm(&f3);
    let s1 = x_in.shape.with_c(1);
    NaiveOut {
        y: naive_crop(&y, s1),
        e1r: naive_crop(&e1r, s1),
        e2r: naive_crop(&e2r, s1),
    }
}

/// A microscopy-like volume: smooth structure on a background of 100 plus noise, in
/// camera-like units (stream_infer and fixed_norm tests).
pub fn test_volume(dims: [usize; 3], seed: u64) -> rln_engine::imaging::Volume {
    let x: Tensor<f32> = random_volume(seed, Shape::new(1, 1, dims[0], dims[1], dims[2]));
    let data: Vec<f32> = x
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let z = i / (dims[1] * dims[2]);
            let y = (i / dims[2]) % dims[1];
            let xx = i % dims[2];
            let s = ((z as f32 * 0.7).sin() * (y as f32 * 0.23).cos() * (xx as f32 * 0.17).sin()).max(0.0);
            100.0 + 800.0 * s * s + 40.0 * v
        })
        .collect();
    rln_engine::imaging::Volume::new(dims, data).unwrap()
}
