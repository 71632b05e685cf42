//! Crop and stitch: the plan covers the volume, the ramps blend to a partition of
//! unity, tiled inference equals whole-volume inference, odd sizes and volumes smaller
//! than one tile work, and the receptive radius is within the default context.

mod common;

use common::*;
use rln_engine::infer::stitch::{run_tiled, Affine, NormalizeMode, StitchOptions};
use rln_engine::infer::tiling::{
    plan_axis, ramp_weights, MemorySink, MemorySource, PlaneSource, TilePlan, DEFAULT_OVERLAP, RECEPTIVE_RADIUS,
};
use rln_engine::infer::{CpuPredictor, TilePredictor};
use rln_engine::model::{Model, Variant};
use rln_engine::tensor::{rel_l2, Shape, Tensor};

#[test]
fn axis_plans_cover_the_axis_with_even_windows_and_overlapping_cores() {
    for len in [1usize, 7, 40, 64, 65, 100, 257, 1000] {
        for (core, ov, ctx) in [(16usize, 4usize, 0usize), (32, 24, 18), (64, 10, 18), (50, 24, 7)] {
            let t = plan_axis(len, core, ov, ctx);
            assert_eq!(t[0].core.0, 0);
            assert_eq!(t.last().unwrap().core.1, len);
            for (i, a) in t.iter().enumerate() {
                assert!(a.window.0 <= a.core.0 && a.core.1 <= a.window.1 && a.window.1 <= len);
                assert_eq!(
                    a.window.0 % 2,
                    0,
                    "window starts must be even ({len} {core} {ov} {ctx})"
                );
                assert!(a.core.1 - a.core.0 <= core.max(len.min(core)));
                if a.core.0 > 0 {
                    assert!(a.core.0 - a.window.0 >= ctx.min(a.core.0), "context before");
                }
                if a.core.1 < len {
                    assert!(a.window.1 - a.core.1 >= ctx.min(len - a.core.1), "context after");
                }
                if i > 0 {
                    assert!(t[i - 1].core.1 >= a.core.0, "gap between cores");
                    assert_eq!(a.overlap_before, t[i - 1].core.1 - a.core.0);
                }
            }
            // summed ramp weights are positive everywhere
            let mut s = vec![0.0f32; len];
            for a in &t {
                for (p, w) in (a.core.0..a.core.1).zip(ramp_weights(a)) {
                    assert!(w > 0.0);
                    s[p] += w;
                }
            }
            assert!(s.iter().all(|&v| v > 0.0));
        }
    }
}

fn predict_whole(m: &Model<f32>, x: &Tensor<f32>) -> Vec<f32> {
    CpuPredictor { model: m.clone() }.predict(x).unwrap().data
}

fn predict_tiled(
    m: &Model<f32>,
    data: &[f32],
    dims: [usize; 3],
    core: [usize; 3],
    context: usize,
) -> (Vec<f32>, usize) {
    let plan = TilePlan::new(dims, core, DEFAULT_OVERLAP, context).unwrap();
    let n = plan.count();
    let opts = StitchOptions {
        plan,
        normalize: NormalizeMode::Global,
        percentiles: [0.01, 99.5],
        rescale_output: false,
        variant: Variant::Single,
    };
    let mut src = MemorySource { dims, data };
    let mut sink = MemorySink { data: Vec::new() };
    let identity = Affine {
        scale: 1.0,
        offset: 0.0,
        p_lo_value: 0.0,
        p_hi_value: 1.0,
    };
    let mut views: Vec<&mut dyn PlaneSource> = vec![&mut src];
    let mut pred = CpuPredictor { model: m.clone() };
    run_tiled(&mut pred, &mut views, &[identity], &mut sink, &opts, &mut |_, _| {}).unwrap();
    (sink.data, n)
}

#[test]
fn tiled_inference_equals_whole_volume_inference() {
    let m: Model<f32> = random_model(80, Variant::Single).cast();
    for (dims, core) in [([44usize, 70, 66], [24usize, 34, 30]), ([41, 57, 63], [20, 28, 26])] {
        let s = Shape::new(1, 1, dims[0], dims[1], dims[2]);
        let x: Tensor<f32> = random_volume(81, s);
        let whole = predict_whole(&m, &x);
        let (tiled, n) = predict_tiled(&m, &x.data, dims, core, RECEPTIVE_RADIUS);
        assert!(n >= 8, "the test must cut several tiles per axis, got {n}");
        let e = rel_l2(&tiled, &whole);
        assert!(e <= 1e-4, "{dims:?}: tiled vs whole rel err {e:e}");
        // the authors' tiling (no context) is visibly different: the test can fail
        let (authors, _) = predict_tiled(&m, &x.data, dims, core, 0);
        assert!(rel_l2(&authors, &whole) > 1e-3);
    }
}

#[test]
fn volume_smaller_than_one_tile_and_odd_sizes() {
    let m: Model<f32> = random_model(82, Variant::Single).cast();
    let dims = [5, 9, 7];
    let x: Tensor<f32> = random_volume(83, Shape::new(1, 1, 5, 9, 7));
    let (tiled, n) = predict_tiled(&m, &x.data, dims, [64, 64, 64], RECEPTIVE_RADIUS);
    assert_eq!(n, 1);
    assert_eq!(tiled, predict_whole(&m, &x));
}

#[test]
fn receptive_radius_is_within_the_default_context() {
    let m: Model<f32> = random_model(84, Variant::Single).cast();
    let n = 56;
    let s = Shape::new(1, 1, n, n, n);
    let x: Tensor<f32> = random_volume(85, s);
    let y0 = predict_whole(&m, &x);
    let mut x1 = x.clone();
    let c = n / 2;
    x1.data[(c * n + c) * n + c] += 1.0;
    let y1 = predict_whole(&m, &x1);
    let mut radius = 0usize;
    for z in 0..n {
        for y in 0..n {
            for xx in 0..n {
                let i = (z * n + y) * n + xx;
                if (y1[i] - y0[i]).abs() > 1e-6 * y0[i].abs().max(1e-3) {
                    radius = radius.max(z.abs_diff(c)).max(y.abs_diff(c)).max(xx.abs_diff(c));
                }
            }
        }
    }
    eprintln!("measured receptive radius: {radius} voxels");
    assert!(radius >= 10, "an impulse must spread (radius {radius})");
    assert!(
        radius <= RECEPTIVE_RADIUS,
        "receptive radius {radius} exceeds the default context {RECEPTIVE_RADIUS}"
    );
}

fn run_views(
    m: &Model<f32>,
    views_data: &[&[f32]],
    dims: [usize; 3],
    core: [usize; 3],
    mode: NormalizeMode,
    variant: Variant,
) -> Vec<f32> {
    let plan = TilePlan::new(dims, core, DEFAULT_OVERLAP, RECEPTIVE_RADIUS).unwrap();
    let opts = StitchOptions {
        plan,
        normalize: mode,
        percentiles: [0.01, 99.5],
        rescale_output: true,
        variant,
    };
    let mut srcs: Vec<MemorySource> = views_data.iter().map(|d| MemorySource { dims, data: d }).collect();
    let global: Vec<Affine> = srcs
        .iter_mut()
        .map(|s| rln_engine::infer::stitch::estimate_normalization(s, [0.01, 99.5], usize::MAX).unwrap())
        .collect();
    let mut sink = MemorySink { data: Vec::new() };
    let mut views: Vec<&mut dyn PlaneSource> = srcs.iter_mut().map(|s| s as &mut dyn PlaneSource).collect();
    run_tiled(
        &mut CpuPredictor { model: m.clone() },
        &mut views,
        &global,
        &mut sink,
        &opts,
        &mut |_, _| {},
    )
    .unwrap();
    sink.data
}

#[test]
fn dual_view_variants_and_per_tile_normalization() {
    let dims = [20, 44, 40];
    let s = Shape::new(1, 1, dims[0], dims[1], dims[2]);
    let a: Tensor<f32> = random_volume(90, s);
    let b: Tensor<f32> = random_volume(91, s);
    let core = [20, 24, 24];
    // dual-average on two identical views is the single-view network
    let mut single: Model<f32> = random_model(92, Variant::Single).cast();
    let y_single = run_views(&single, &[&a.data], dims, core, NormalizeMode::Global, Variant::Single);
    single.config.variant = Variant::DualAverage;
    let y_avg = run_views(
        &single,
        &[&a.data, &a.data],
        dims,
        core,
        NormalizeMode::Global,
        Variant::DualAverage,
    );
    assert!(rel_l2(&y_avg, &y_single) < 1e-6);
    // and on two different views it is the single-view network on their normalized mean
    let y_ab = run_views(
        &single,
        &[&a.data, &b.data],
        dims,
        core,
        NormalizeMode::Global,
        Variant::DualAverage,
    );
    assert!(rel_l2(&y_ab, &y_single) > 1e-3);
    // dual-concat: tiled equals the whole two-channel volume through the network
    let cat: Model<f32> = random_model(93, Variant::DualConcat).cast();
    let y_cat = run_views(
        &cat,
        &[&a.data, &b.data],
        dims,
        core,
        NormalizeMode::Global,
        Variant::DualConcat,
    );
    let (na, nb) = (normalized(&a.data), normalized(&b.data));
    let x2 = Tensor::from_vec(s.with_c(2), [na.0.clone(), nb.0].concat()).unwrap();
    let whole: Vec<f32> = predict_whole(&cat, &x2).iter().map(|&v| na.1.invert(v)).collect();
    assert!(rel_l2(&y_cat, &whole) < 1e-4, "{:e}", rel_l2(&y_cat, &whole));
    // per-tile normalization (the authors'): one tile → prediction × the tile's P_hi
    let single: Model<f32> = random_model(94, Variant::Single).cast();
    let y_pt = run_views(
        &single,
        &[&a.data],
        dims,
        [64, 64, 64],
        NormalizeMode::PerTile,
        Variant::Single,
    );
    let (n, aff) = normalized(&a.data);
    let want: Vec<f32> = predict_whole(&single, &Tensor::from_vec(s, n).unwrap())
        .iter()
        .map(|&v| v * aff.p_hi_value as f32)
        .collect();
    assert!(rel_l2(&y_pt, &want) < 1e-6);
}

fn normalized(v: &[f32]) -> (Vec<f32>, Affine) {
    let p = rln_engine::imaging::normalize::percentiles(v, &[0.01, 99.5]).unwrap();
    let aff = Affine::from_percentile_values(p[0], p[1]);
    (v.iter().map(|&x| aff.apply(x)).collect(), aff)
}

/// A predictor that runs out of "device memory" for windows above a size.
struct Tight {
    inner: CpuPredictor,
    max_voxels: usize,
    refused: usize,
}
impl TilePredictor for Tight {
    fn describe(&self) -> String {
        "tight".into()
    }
    fn predict(&mut self, x: &Tensor<f32>) -> rln_engine::Result<Tensor<f32>> {
        if x.shape.len() > self.max_voxels {
            self.refused += 1;
            return Err(rln_engine::Error::OutOfMemory(format!("{} voxels", x.shape.len())));
        }
        self.inner.predict(x)
    }
    fn bytes_per_voxel(&self) -> usize {
        4
    }
}

#[test]
fn out_of_memory_retries_with_smaller_tiles_and_then_fails_clearly() {
    use rln_engine::infer::stitch::run_tiled_shrinking;
    let m: Model<f32> = random_model(95, Variant::Single).cast();
    let dims = [12, 120, 120];
    let x: Tensor<f32> = random_volume(96, Shape::new(1, 1, 12, 120, 120));
    let identity = Affine {
        scale: 1.0,
        offset: 0.0,
        p_lo_value: 0.0,
        p_hi_value: 1.0,
    };
    let plan = TilePlan::new(dims, [64, 64, 64], DEFAULT_OVERLAP, RECEPTIVE_RADIUS).unwrap();
    let opts = StitchOptions {
        plan,
        normalize: NormalizeMode::Global,
        percentiles: [0.01, 99.5],
        rescale_output: false,
        variant: Variant::Single,
    };
    let mut pred = Tight {
        inner: CpuPredictor { model: m.clone() },
        max_voxels: 12 * 90 * 90,
        refused: 0,
    };
    let mut src = MemorySource { dims, data: &x.data };
    let mut views: Vec<&mut dyn PlaneSource> = vec![&mut src];
    let mut plans = 0;
    let (y, _, core) = run_tiled_shrinking(
        &mut pred,
        &mut views,
        &[identity],
        &opts,
        [64, 64, 64],
        DEFAULT_OVERLAP,
        RECEPTIVE_RADIUS,
        &mut |_, _| plans += 1,
        &mut |_, _| {},
    )
    .unwrap();
    assert!(
        pred.refused >= 1 && plans >= 2,
        "the first plan must fail and a smaller one succeed"
    );
    assert!(core[1] < 64);
    assert!(rel_l2(&y, &predict_whole(&m, &x)) <= 1e-4);
    // nothing fits: a clear out-of-memory error, no panic
    let mut pred = Tight {
        inner: CpuPredictor { model: m },
        max_voxels: 10,
        refused: 0,
    };
    let e = run_tiled_shrinking(
        &mut pred,
        &mut views,
        &[identity],
        &opts,
        [64, 64, 64],
        DEFAULT_OVERLAP,
        RECEPTIVE_RADIUS,
        &mut |_, _| {},
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(e.is_out_of_memory() && e.to_string().contains("--tile"), "{e}");
}
