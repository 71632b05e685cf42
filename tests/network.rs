//! The optimized CPU network against the naive one (tests/common), for odd sizes, batch
//! sizes 1–4, both batch-norm modes and every model variant; the running-statistics
//! update; independence of the thread count.

mod common;

use common::*;
use rln_engine::backend::cpu::CpuBackend;
use rln_engine::backend::{Backend, GradMode};
use rln_engine::model::{Model, Variant, L};
use rln_engine::net::{update_running_stats, BnMode, Rln};
use rln_engine::tensor::{rel_l2, Shape, Tensor};

fn check_against_naive(variant: Variant, shape: Shape, seed: u64) {
    let m64 = random_model(seed, variant);
    let x64: Tensor<f64> = random_volume(seed + 1, shape);
    for batch_stats in [false, true] {
        let want = naive_forward(&m64, &x64, batch_stats);
        let mode = if batch_stats { BnMode::Batch } else { BnMode::Running };
        // f64: the same function up to rounding
        let got = Rln::new(&CpuBackend::<f64>::new(), &m64)
            .forward(&x64, mode, false)
            .unwrap();
        for (name, g, w) in [
            ("y", &got.prediction, &want.y),
            ("e1r", &got.e1_raw, &want.e1r),
            ("e2r", &got.e2_raw, &want.e2r),
        ] {
            assert_eq!(g.shape, w.shape);
            let e = rel_l2(&g.data, &w.data);
            assert!(
                e < 1e-12,
                "{variant:?} {shape} batch_stats={batch_stats} f64 {name}: rel err {e:e}"
            );
        }
        // f32: within float32 rounding of the f64 result
        let m32: Model<f32> = m64.cast();
        let got = Rln::new(&CpuBackend::<f32>::new(), &m32)
            .forward(&x64.cast(), mode, false)
            .unwrap();
        let e = rel_l2(&got.prediction.data, &want.y.data);
        assert!(
            e < 2e-5,
            "{variant:?} {shape} batch_stats={batch_stats} f32 y: rel err {e:e}"
        );
    }
}

#[test]
fn matches_naive_for_batch_sizes_1_to_4_and_odd_sizes() {
    let shapes = [
        Shape::new(1, 1, 6, 8, 10),
        Shape::new(2, 1, 5, 7, 9),  // every dimension odd
        Shape::new(3, 1, 4, 3, 12), // one odd dimension, tiny
        Shape::new(4, 1, 2, 6, 38), // W beyond one 32-wide chunk, not a multiple of it
        Shape::new(1, 1, 1, 1, 1),  // a single voxel
    ];
    for (i, s) in shapes.iter().enumerate() {
        check_against_naive(Variant::Single, *s, 100 + i as u64);
    }
}

#[test]
fn matches_naive_for_every_depth_1_to_9_with_odd_and_even_planes() {
    // thin volumes: depths 1 and 2 pool to one half-resolution plane, odd depths are
    // mirror-padded; H and W odd and even, below and above one vector
    for d in 1..=9usize {
        for (i, (h, w)) in [(2usize, 3usize), (7, 10), (4, 17)].into_iter().enumerate() {
            check_against_naive(
                Variant::Single,
                Shape::new(1, 1, d, h, w),
                300 + 10 * d as u64 + i as u64,
            );
        }
    }
}

#[test]
fn matches_naive_for_dual_view_concat_variant() {
    check_against_naive(Variant::DualConcat, Shape::new(2, 2, 4, 6, 5), 7);
}

#[test]
fn wide_volume_exercises_every_kernel_width() {
    // W = 130: chunks of 8/16/32 with a partial last chunk; H, D small to keep it fast
    check_against_naive(Variant::Single, Shape::new(1, 1, 2, 2, 130), 9);
}

#[test]
fn running_statistics_update_once_per_step() {
    let mut m = random_model(3, Variant::Single);
    let x: Tensor<f64> = random_volume(4, Shape::new(2, 1, 6, 6, 6));
    let before = m.running.clone();
    let fwd = Rln::new(&CpuBackend::<f64>::new(), &m)
        .forward(&x, BnMode::Batch, false)
        .unwrap();
    // the forward pass itself never changes the model (it only borrows it)
    assert_eq!(m.running, before);
    // BN0 normalizes conv(avgpool(x); e1): check its batch statistics independently
    let z = naive_conv3(&naive_pool(&x), &m.params.layers[0].weight, 4);
    let s = fwd.batch_stats[L::H1FpConv1 as usize].as_ref().expect("BN0 statistics");
    for c in 0..4 {
        let v: Vec<f64> = (0..2).flat_map(|n| z.plane(n, c).to_vec()).collect();
        let mu = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|a| (a - mu).powi(2)).sum::<f64>() / v.len() as f64; // biased
        assert!((s.mean[c] - mu).abs() < 1e-12 && (s.var[c] - var).abs() < 1e-12);
    }
    update_running_stats(&mut m, &fwd.batch_stats);
    for c in 0..4 {
        let want_m = 0.99 * before.mean[0][c] + 0.01 * s.mean[c];
        let want_v = 0.99 * before.var[0][c] + 0.01 * s.var[c];
        assert!((m.running.mean[0][c] - want_m).abs() < 1e-15);
        assert!((m.running.var[0][c] - want_v).abs() < 1e-15);
    }
    // layers without batch norm (h3.conv1, h3.conv2) report no statistics; all 17 others do
    assert_eq!(fwd.batch_stats.iter().filter(|s| s.is_some()).count(), 17);
    assert!(fwd.batch_stats[L::H3Conv1 as usize].is_none());
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let m: Model<f32> = random_model(11, Variant::Single).cast();
    let x: Tensor<f32> = random_volume(12, Shape::new(2, 1, 8, 10, 12));
    let g: Tensor<f32> = random_volume(13, Shape::new(2, 1, 8, 10, 12));
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let b = CpuBackend::<f32>::new();
            let net = Rln::new(&b, &m);
            let fwd = net.forward(&x, BnMode::Batch, true).unwrap();
            let (terms, dy, de) = b.loss(&fwd.prediction, &fwd.e1_raw, &x, &g).unwrap();
            (
                fwd.prediction.data.clone(),
                terms.loss,
                net.backward(&fwd, &dy, &de, GradMode::Paper).unwrap(),
            )
        })
    };
    let (y1, l1, g1) = run(1);
    let (y3, l3, g3) = run(3);
    assert_eq!(y1, y3);
    assert_eq!(l1, l3);
    assert_eq!(g1, g3, "gradients differ between 1 and 3 threads");
}
