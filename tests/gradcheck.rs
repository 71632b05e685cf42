//! Exact-mode gradients against central finite differences (f64): every op with a
//! backward pass, and the whole network with its loss. Then paper mode against exact
//! mode: they must differ exactly where rln-spec.md §5 says, and nowhere else.

mod common;

use common::*;
use rand::Rng;
use rln_engine::backend::cpu::CpuBackend;
use rln_engine::backend::{Addend, Backend, BnTrainState, Epilogue, GradMode};
use rln_engine::model::{Model, Params, Variant, L};
use rln_engine::net::{BnMode, Rln};
use rln_engine::tensor::{rel_l2, Shape, Tensor};

type X = Tensor<f64>;
const B: CpuBackend<f64> = CpuBackend::<f64>::new_const();

/// 4th-order central difference of f at v along coordinate i.
fn fd(mut f: impl FnMut(f64) -> f64, v: f64) -> f64 {
    let h = 1e-4 * v.abs().max(1.0);
    (8.0 * (f(v + h) - f(v - h)) - (f(v + 2.0 * h) - f(v - 2.0 * h))) / (12.0 * h)
}

fn dot(a: &X, b: &X) -> f64 {
    a.data.iter().zip(&b.data).map(|(x, y)| x * y).sum()
}

/// Compares an analytic gradient with finite differences on a sample of coordinates.
fn check(name: &str, analytic: &[f64], mut numeric_at: impl FnMut(usize) -> f64, samples: usize, seed: u64) {
    let mut r = rng(seed);
    let idx: Vec<usize> = (0..samples.min(analytic.len()))
        .map(|_| r.random_range(0..analytic.len()))
        .collect();
    let a: Vec<f64> = idx.iter().map(|&i| analytic[i]).collect();
    let n: Vec<f64> = idx.iter().map(|&i| numeric_at(i)).collect();
    let e = rel_l2(&a, &n);
    assert!(
        e <= 1e-6,
        "{name}: analytic vs finite differences rel err {e:e}\n analytic {a:?}\n numeric  {n:?}"
    );
}

#[test]
fn conv3_gradients() {
    let s = Shape::new(2, 3, 4, 5, 6);
    let x0: X = random_volume(1, s);
    let x1: X = random_volume(2, s.with_c(2));
    let co = 5;
    let mut r = rng(3);
    let w: Vec<f64> = (0..co * 5 * 27).map(|_| r.random_range(-1.0..1.0)).collect();
    let rw: X = random_volume(4, s.with_c(co));
    let loss = |x0: &X, x1: &X, w: &[f64]| dot(&B.conv3(&[x0, x1], w, co, &Epilogue::identity()).unwrap(), &rw);
    let dx = B.conv3_backward_data(&rw, &w, &[3, 2], &[true, true]).unwrap();
    let dw = B.conv3_backward_weight(&[&x0, &x1], &rw).unwrap();
    check(
        "conv3 ∂x0",
        &dx[0].as_ref().unwrap().data,
        |i| {
            fd(
                |v| {
                    let mut t = x0.clone();
                    t.data[i] = v;
                    loss(&t, &x1, &w)
                },
                x0.data[i],
            )
        },
        40,
        5,
    );
    check(
        "conv3 ∂x1",
        &dx[1].as_ref().unwrap().data,
        |i| {
            fd(
                |v| {
                    let mut t = x1.clone();
                    t.data[i] = v;
                    loss(&x0, &t, &w)
                },
                x1.data[i],
            )
        },
        40,
        6,
    );
    check(
        "conv3 ∂w",
        &dw,
        |i| {
            fd(
                |v| {
                    let mut t = w.clone();
                    t[i] = v;
                    loss(&x0, &x1, &t)
                },
                w[i],
            )
        },
        60,
        7,
    );
    // the data gradient of an input not asked for is not computed
    assert!(B.conv3_backward_data(&rw, &w, &[3, 2], &[false, true]).unwrap()[0].is_none());
}

#[test]
fn up2_gradients() {
    let s = Shape::new(2, 3, 2, 3, 2);
    let x: X = random_volume(10, s);
    let co = 4;
    let mut r = rng(11);
    let w: Vec<f64> = (0..3 * co * 8).map(|_| r.random_range(-1.0..1.0)).collect();
    let rw: X = random_volume(12, Shape::new(2, co, 4, 6, 4));
    let loss = |x: &X, w: &[f64]| dot(&B.up2(x, w, co, &Epilogue::identity()).unwrap(), &rw);
    let dx = B.up2_backward_data(&rw, &w, 3).unwrap();
    let dw = B.up2_backward_weight(&x, &rw).unwrap();
    check(
        "up2 ∂x",
        &dx.data,
        |i| {
            fd(
                |v| {
                    let mut t = x.clone();
                    t.data[i] = v;
                    loss(&t, &w)
                },
                x.data[i],
            )
        },
        40,
        13,
    );
    check(
        "up2 ∂w",
        &dw,
        |i| {
            fd(
                |v| {
                    let mut t = w.clone();
                    t[i] = v;
                    loss(&x, &t)
                },
                w[i],
            )
        },
        40,
        14,
    );
}

/// act(bn_batch(z)) + addend, as the network's training mode computes it.
fn bn_epilogue(z: &X, gamma: &[f64], beta: &[f64], softplus: bool, addend: Option<&X>, bn: bool) -> X {
    let stats = B.batch_stats(z).unwrap();
    let c = z.shape.c;
    let (scale, shift): (Vec<f64>, Vec<f64>) = if bn {
        (0..c)
            .map(|k| {
                let is = 1.0 / (stats.var[k] + 1e-3).sqrt();
                (gamma[k] * is, beta[k] - stats.mean[k] * gamma[k] * is)
            })
            .unzip()
    } else {
        (vec![], vec![])
    };
    let add = match addend {
        Some(a) => Addend::SoftplusOf(a),
        None => Addend::Const(0.25),
    };
    B.epilogue(
        z,
        &Epilogue {
            scale: &scale,
            shift: &shift,
            softplus,
            addend: add,
        },
    )
    .unwrap()
}

#[test]
fn batch_norm_softplus_epilogue_gradients() {
    let s = Shape::new(3, 4, 3, 4, 5);
    let z: X = random_volume(20, s);
    let add: X = random_volume(21, s.with_c(1));
    let rw: X = random_volume(22, s);
    let gamma = vec![0.7, 1.3, 1.0, 0.4];
    let beta = vec![0.1, -0.2, 0.3, 0.0];
    for (softplus, bn, with_addend) in [(true, true, true), (false, true, false), (true, false, false)] {
        let loss =
            |z: &X, g: &[f64], b: &[f64]| dot(&bn_epilogue(z, g, b, softplus, with_addend.then_some(&add), bn), &rw);
        let stats = B.batch_stats(&z).unwrap();
        let state = BnTrainState {
            gamma: gamma.clone(),
            beta: beta.clone(),
            mean: stats.mean.clone(),
            inv_std: stats.var.iter().map(|v| 1.0 / (v + 1e-3).sqrt()).collect(),
            resident: 0,
        };
        let (dz, dg, db) = B.epilogue_backward(&z, &rw, softplus, bn.then_some(&state)).unwrap();
        let tag = format!("epilogue(softplus={softplus}, bn={bn})");
        check(
            &format!("{tag} ∂z"),
            &dz.data,
            |i| {
                fd(
                    |v| {
                        let mut t = z.clone();
                        t.data[i] = v;
                        loss(&t, &gamma, &beta)
                    },
                    z.data[i],
                )
            },
            40,
            23,
        );
        if bn {
            check(
                &format!("{tag} ∂γ"),
                &dg,
                |i| {
                    fd(
                        |v| {
                            let mut t = gamma.clone();
                            t[i] = v;
                            loss(&z, &t, &beta)
                        },
                        gamma[i],
                    )
                },
                4,
                24,
            );
            check(
                &format!("{tag} ∂β"),
                &db,
                |i| {
                    fd(
                        |v| {
                            let mut t = beta.clone();
                            t[i] = v;
                            loss(&z, &gamma, &t)
                        },
                        beta[i],
                    )
                },
                4,
                25,
            );
        } else {
            assert!(dg.is_empty() && db.is_empty());
        }
    }
}

#[test]
fn rl_nodes_and_channel_mean_gradients() {
    let s = Shape::new(2, 1, 3, 4, 5);
    let a: X = random_volume(30, s);
    let fp: X = random_volume(31, s.with_c(4));
    let rw: X = random_volume(32, s);
    let eps = 1e-3;
    // division, exact mode
    let loss = |a: &X, fp: &X| dot(&B.rl_divide(a, fp, eps).unwrap(), &rw);
    let (da, dfp) = B.rl_divide_backward(&a, &fp, eps, &rw, GradMode::Exact).unwrap();
    check(
        "rl_divide ∂a",
        &da.data,
        |i| {
            fd(
                |v| {
                    let mut t = a.clone();
                    t.data[i] = v;
                    loss(&t, &fp)
                },
                a.data[i],
            )
        },
        30,
        33,
    );
    check(
        "rl_divide ∂fp",
        &dfp.data,
        |i| {
            fd(
                |v| {
                    let mut t = fp.clone();
                    t.data[i] = v;
                    loss(&a, &t)
                },
                fp.data[i],
            )
        },
        30,
        34,
    );
    // update, exact mode
    let loss = |a: &X, bp: &X| dot(&B.rl_update(a, bp).unwrap(), &rw);
    let (da, dbp) = B.rl_update_backward(&a, &fp, &rw, GradMode::Exact).unwrap();
    check(
        "rl_update ∂a",
        &da.data,
        |i| {
            fd(
                |v| {
                    let mut t = a.clone();
                    t.data[i] = v;
                    loss(&t, &fp)
                },
                a.data[i],
            )
        },
        30,
        35,
    );
    check(
        "rl_update ∂bp",
        &dbp.data,
        |i| {
            fd(
                |v| {
                    let mut t = fp.clone();
                    t.data[i] = v;
                    loss(&a, &t)
                },
                fp.data[i],
            )
        },
        30,
        36,
    );
    // channel mean
    let dcm = B.channel_mean_backward(&rw, 4).unwrap();
    check(
        "channel_mean ∂x",
        &dcm.data,
        |i| {
            fd(
                |v| {
                    let mut t = fp.clone();
                    t.data[i] = v;
                    dot(&B.channel_mean(&t).unwrap(), &rw)
                },
                fp.data[i],
            )
        },
        30,
        37,
    );
    // paper mode: spec §5's substitutes, exactly
    let (da_p, dfp_p) = B.rl_divide_backward(&a, &fp, eps, &rw, GradMode::Paper).unwrap();
    let cm = B.channel_mean(&fp).unwrap();
    for i in 0..a.data.len() {
        let q = a.data[i] / (cm.data[i] + eps);
        assert_eq!(da_p.data[i], rw.data[i], "paper ∂a := ∂q");
        for c in 0..4 {
            let want = -q * q * rw.data[i] / 4.0;
            let got = dfp_p.data[(i / s.spatial() * 4 + c) * s.spatial() + i % s.spatial()];
            assert!(
                (got - want).abs() <= 1e-15 * want.abs().max(1e-300),
                "paper ∂b := −q²·∂q"
            );
        }
    }
    let (da_p, dbp_p) = B.rl_update_backward(&a, &fp, &rw, GradMode::Paper).unwrap();
    assert_eq!(da_p.data, rw.data, "paper ∂E1 := ∂E2r");
    assert_eq!(dbp_p.data, dbp.data, "∂m is exact in both modes");
}

/// Loss of the network in training mode, and its gradients in `mode`.
fn net_loss(m: &Model<f64>, x: &X, g: &X) -> f64 {
    let net = Rln::new(&B, m);
    let f = net.forward(x, BnMode::Batch, false).unwrap();
    B.loss(&f.prediction, &f.e1_raw, x, g).unwrap().0.loss
}

fn net_grads(m: &Model<f64>, x: &X, g: &X, mode: GradMode) -> Params<f64> {
    let net = Rln::new(&B, m);
    let f = net.forward(x, BnMode::Batch, true).unwrap();
    let (_, dy, de) = B.loss(&f.prediction, &f.e1_raw, x, g).unwrap();
    net.backward(&f, &dy, &de, mode).unwrap()
}

fn whole_network_check(shape: Shape, seed: u64) {
    let m = random_model(seed, Variant::Single);
    let x: X = random_volume(seed + 1, shape);
    let g: X = random_volume(seed + 2, shape);
    let grads = net_grads(&m, &x, &g, GradMode::Exact);
    for (l, k) in grads.ids() {
        let name = Params::<f64>::name(l, k);
        let p0 = m.params.tensor(l, k).clone();
        check(
            &name,
            grads.tensor(l, k),
            |i| {
                fd(
                    |v| {
                        let mut mm = m.clone();
                        mm.params.tensor_mut(l, k)[i] = v;
                        net_loss(&mm, &x, &g)
                    },
                    p0[i],
                )
            },
            3,
            seed + l as u64 * 7 + k as u64,
        );
    }
}

#[test]
fn whole_network_exact_gradients_match_finite_differences() {
    whole_network_check(Shape::new(2, 1, 4, 6, 8), 40);
}

#[test]
fn whole_network_exact_gradients_with_odd_sizes() {
    whole_network_check(Shape::new(1, 1, 5, 6, 7), 50);
}

#[test]
fn paper_and_exact_modes_differ_exactly_where_the_spec_says() {
    let m = random_model(60, Variant::Single);
    let shape = Shape::new(2, 1, 6, 6, 8);
    let x: X = random_volume(61, shape);
    let g: X = random_volume(62, shape);
    let exact = net_grads(&m, &x, &g, GradMode::Exact);
    let paper = net_grads(&m, &x, &g, GradMode::Paper);
    // Downstream of both custom nodes (merge part, h2.e, h2.bp and h2.dv's own BN) the
    // gradients flow through exact rules only: identical. The FP2 convs (upstream of the
    // DV2 division) and all of h1 (upstream of E2r = E1·m via E1) differ.
    let same = [
        L::H3Conv1,
        L::H3Conv2,
        L::H3Conv3,
        L::H2E,
        L::H2BpConv1,
        L::H2BpConv2,
        L::H2Dv,
    ];
    for (l, k) in exact.ids() {
        let name = Params::<f64>::name(l, k);
        let d = rel_l2(paper.tensor(l, k), exact.tensor(l, k));
        if same.iter().any(|s| *s as usize == l) {
            assert_eq!(
                d, 0.0,
                "{name}: paper and exact gradients should be identical, differ by {d:e}"
            );
        } else {
            assert!(
                d > 1e-3,
                "{name}: paper and exact gradients should differ, rel diff only {d:e}"
            );
        }
    }
}
