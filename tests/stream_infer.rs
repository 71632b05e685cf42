//! Streaming inference (`infer::stream`): the chunk-aligned cores pipeline equals the
//! in-memory `deconvolve`, blocks of a split run equal the single run bit for bit, a
//! killed run resumed equals an uninterrupted one, several predictors (devices) equal one
//! in both tilings, the sampled percentiles are close to the exact ones, and bad inputs
//! give clear errors.

mod common;

use common::*;
use rln_engine::imaging::stream::{MemoryVolume, Region, VolumeReader, VolumeWriter};
use rln_engine::imaging::Volume;
use rln_engine::infer::pool::PredictorPool;
use rln_engine::infer::stitch::{estimate_normalization, run_tiled, Affine, NormalizeMode, StitchOptions};
use rln_engine::infer::stream::norm::{sample_stats, ViewStats};
use rln_engine::infer::stream::pipeline::{run_tiles, PipelineHooks, PipelineOptions};
use rln_engine::infer::stream::plan::CorePlan;
use rln_engine::infer::stream::{run_job, Job, JobSpec};
use rln_engine::infer::tiling::{MemorySink, MemorySource, PlaneSource, TilePlan, DEFAULT_OVERLAP, RECEPTIVE_RADIUS};
use rln_engine::infer::{deconvolve, CpuPredictor, TilePredictor};
use rln_engine::model::{Model, Variant};
use rln_engine::tensor::{rel_l2, Tensor};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const MODEL: &str = "models/rln-synthetic-widefield.safetensors";

fn shipped_model() -> Model<f32> {
    Model::<f32>::load(Path::new(MODEL)).unwrap()
}

fn stats(v: &dyn VolumeReader, model: &Model<f32>) -> ViewStats {
    sample_stats(v, model.config.norm_percentiles, usize::MAX).unwrap()
}

fn no_hooks() -> (impl Fn(usize) + Sync, impl Fn(usize) + Sync) {
    (|_| {}, |_| {})
}

/// The cores pipeline on `vol` into a memory volume chunked in `unit`.
fn streamed(model: &Model<f32>, vol: &Volume, unit: [usize; 3], core: [usize; 3], job: Job) -> (Vec<f32>, usize) {
    let input = MemoryVolume::new(vol.dims, vol.data.clone()).unwrap().with_unit(unit);
    let out = MemoryVolume::new(vol.dims, vec![f32::NAN; vol.len()])
        .unwrap()
        .with_unit(unit);
    let aff = stats(&input, model).affine();
    let (aligned, _) = CorePlan::align_core(vol.dims, core, unit);
    let plan = CorePlan::new(vol.dims, aligned, RECEPTIVE_RADIUS).unwrap();
    let mut pred = CpuPredictor { model: model.clone() };
    let (_, computed, _) = run_job(
        &mut [&mut pred],
        &JobSpec::full(&[&input], &[aff], Variant::Single, &plan).job(job),
        &out,
        &|_| {},
    )
    .unwrap();
    (out.into_data(), computed)
}

#[test]
fn streamed_cores_equal_in_memory_deconvolve() {
    let model = shipped_model();
    // (dims, chunk unit, core): many tiles; odd sizes with anisotropic chunks; one tile
    for (dims, unit, core) in [
        ([20usize, 70, 90], [4usize, 16, 16], [16usize, 32, 32]),
        ([21, 67, 89], [3, 10, 24], [12, 30, 48]),
        ([20, 70, 90], [20, 70, 90], [64, 128, 128]),
    ] {
        let vol = test_volume(dims, 11);
        let mut pred = CpuPredictor { model: model.clone() };
        let reference = deconvolve(&mut pred, &model, &vol, [24, 48, 48]).unwrap();
        let (got, tiles) = streamed(&model, &vol, unit, core, Job::Full);
        assert!(got.iter().all(|v| v.is_finite()), "{dims:?}: a voxel was not written");
        let e = rel_l2(&got, &reference.data);
        eprintln!("{dims:?} unit {unit:?} core {core:?}: {tiles} tile(s), rel L2 vs deconvolve {e:.2e}");
        assert!(e <= 1e-6, "{dims:?}: streamed vs in-memory rel err {e:e}");
        if core[1] < dims[1] {
            assert!(tiles >= 8, "the test must cut many tiles, got {tiles}");
        } else {
            assert_eq!(tiles, 1);
        }
    }
}

#[test]
fn the_union_of_all_blocks_equals_the_single_run_bit_for_bit() {
    let model = shipped_model();
    let dims = [20, 70, 90];
    let vol = test_volume(dims, 12);
    let unit = [4, 16, 16];
    let core = [8, 32, 32];
    let (single, total) = streamed(&model, &vol, unit, core, Job::Full);
    let n = 4;
    let input = MemoryVolume::new(dims, vol.data.clone()).unwrap().with_unit(unit);
    let out = MemoryVolume::new(dims, vec![f32::NAN; vol.len()])
        .unwrap()
        .with_unit(unit);
    let aff = stats(&input, &model).affine();
    let plan = CorePlan::new(dims, CorePlan::align_core(dims, core, unit).0, RECEPTIVE_RADIUS).unwrap();
    let mut sum = 0;
    // blocks in a scrambled order, as a scheduler may run them
    for i in [2, 0, 3, 1] {
        let mut pred = CpuPredictor { model: model.clone() };
        let (_, c, _) = run_job(
            &mut [&mut pred],
            &JobSpec::full(&[&input], &[aff], Variant::Single, &plan).job(Job::Block(i, n)),
            &out,
            &|_| {},
        )
        .unwrap();
        sum += c;
    }
    assert_eq!(sum, total);
    let union = out.into_data();
    assert!(
        union.iter().zip(&single).all(|(a, b)| a.to_bits() == b.to_bits()),
        "blocks differ from the single run"
    );
}

/// A writer that fails (as a killed process would stop) after `fail_after` writes.
struct FailingWriter<'a> {
    inner: &'a MemoryVolume,
    writes: AtomicUsize,
    fail_after: usize,
}

impl VolumeWriter for FailingWriter<'_> {
    fn dims(&self) -> [usize; 3] {
        VolumeWriter::dims(self.inner)
    }
    fn write_unit(&self) -> [usize; 3] {
        self.inner.write_unit()
    }
    fn write_region(&self, region: Region, data: &[f32]) -> rln_engine::Result<()> {
        if self.writes.fetch_add(1, Ordering::SeqCst) >= self.fail_after {
            return Err(rln_engine::Error::invalid("simulated kill"));
        }
        self.inner.write_region(region, data)
    }
    fn finish(self: Box<Self>) -> rln_engine::Result<()> {
        Ok(())
    }
}

/// A run of `workers` predictors whose writer fails after `fail_after` writes, then a
/// resumed run into the same store. Returns the resumed run's (tiles computed, tiles
/// skipped), the plan's tile count and the store's data.
fn stop_then_resume(
    model: &Model<f32>,
    vol: &Volume,
    unit: [usize; 3],
    core: [usize; 3],
    workers: usize,
    fail_after: usize,
) -> (usize, usize, usize, Vec<f32>) {
    let dims = vol.dims;
    let input = MemoryVolume::new(dims, vol.data.clone()).unwrap().with_unit(unit);
    let store = MemoryVolume::new(dims, vec![f32::NAN; vol.len()])
        .unwrap()
        .with_unit(unit);
    let aff = stats(&input, model).affine();
    let plan = CorePlan::new(dims, CorePlan::align_core(dims, core, unit).0, RECEPTIVE_RADIUS).unwrap();
    let meta = tempfile::tempdir().unwrap();
    let run = |fail_after: usize, resume: bool| {
        let w = FailingWriter {
            inner: &store,
            writes: AtomicUsize::new(0),
            fail_after,
        };
        let mut preds: Vec<CpuPredictor> = (0..workers).map(|_| CpuPredictor { model: model.clone() }).collect();
        let mut refs: Vec<&mut dyn TilePredictor> = preds.iter_mut().map(|p| p as &mut dyn TilePredictor).collect();
        run_job(
            &mut refs,
            &JobSpec::full(&[&input], &[aff], Variant::Single, &plan).watermark(meta.path(), resume),
            &w,
            &|_| {},
        )
    };
    assert!(run(fail_after, false).is_err(), "the first run must stop");
    let (_, computed, skipped) = run(usize::MAX, true).unwrap();
    (computed, skipped, plan.count(), store.into_data())
}

#[test]
fn an_interrupted_run_resumed_equals_an_uninterrupted_one() {
    let model = shipped_model();
    let dims = [20, 70, 90];
    let vol = test_volume(dims, 13);
    let unit = [4, 16, 16];
    let core = [8, 32, 32];
    let (whole, total) = streamed(&model, &vol, unit, core, Job::Full);
    let k = 5;
    let (computed, skipped, _, got) = stop_then_resume(&model, &vol, unit, core, 1, k);
    assert_eq!(skipped, k, "resume must skip the tiles written before the stop");
    assert_eq!(computed + skipped, total);
    // skipped tiles that were not written would still be NaN
    assert!(
        got.iter().zip(&whole).all(|(a, b)| a.to_bits() == b.to_bits()),
        "resumed run differs from the uninterrupted one"
    );
}

#[test]
fn sampling_error_on_test_volumes() {
    // exact percentiles vs a sample of 1/16 of the voxels in chunks
    let pct = [0.01, 99.5];
    let mut worst: f64 = 0.0;
    for (seed, dims, unit) in [
        (21u64, [64usize, 128, 128], [8usize, 32, 32]),
        (22, [40, 200, 150], [1, 200, 150]),
        (23, [96, 96, 96], [16, 16, 16]),
    ] {
        let v = test_volume(dims, seed);
        let r = MemoryVolume::new(dims, v.data.clone()).unwrap().with_unit(unit);
        let exact = sample_stats(&r, pct, usize::MAX).unwrap();
        assert!(exact.exact);
        let s = sample_stats(&r, pct, v.len() / 16).unwrap();
        assert!(!s.exact && s.sampled_voxels <= v.len() / 16);
        let range = exact.p_hi_value - exact.p_lo_value;
        let e = ((s.p_lo_value - exact.p_lo_value).abs()).max((s.p_hi_value - exact.p_hi_value).abs()) / range;
        eprintln!(
            "{dims:?} unit {unit:?}: exact ({:.2}, {:.2}), sampled ({:.2}, {:.2}) from {} voxels: error {:.3}% of the range",
            exact.p_lo_value,
            exact.p_hi_value,
            s.p_lo_value,
            s.p_hi_value,
            s.sampled_voxels,
            100.0 * e
        );
        worst = worst.max(e);
    }
    // `infer --help` states this bound
    assert!(
        worst <= 0.01,
        "sampled percentiles off by {:.3}% of the range",
        100.0 * worst
    );
}

#[test]
fn views_of_different_shapes_are_refused() {
    let model: Model<f32> = random_model(5, Variant::DualConcat).cast();
    let a = MemoryVolume::zeros([8, 16, 16]);
    let b = MemoryVolume::zeros([8, 16, 18]);
    let out = MemoryVolume::zeros([8, 16, 16]);
    let plan = CorePlan::new([8, 16, 16], [8, 16, 16], RECEPTIVE_RADIUS).unwrap();
    let id = Affine::from_percentile_values(0.0, 1.0);
    let (w, p) = no_hooks();
    let err = run_tiles(
        &mut [&mut CpuPredictor { model }],
        &[&a, &b],
        &[id, id],
        Variant::DualConcat,
        &out,
        &plan,
        &[0],
        PipelineOptions::default(),
        &PipelineHooks {
            written: &w,
            progress: &p,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("views differ in size"), "{err}");
}

/// The cores pipeline of `streamed`, with `workers` CPU predictors on their own threads.
fn streamed_by(model: &Model<f32>, vol: &Volume, unit: [usize; 3], core: [usize; 3], workers: usize) -> Vec<f32> {
    let input = MemoryVolume::new(vol.dims, vol.data.clone()).unwrap().with_unit(unit);
    let out = MemoryVolume::new(vol.dims, vec![f32::NAN; vol.len()])
        .unwrap()
        .with_unit(unit);
    let aff = stats(&input, model).affine();
    let plan = CorePlan::new(vol.dims, CorePlan::align_core(vol.dims, core, unit).0, RECEPTIVE_RADIUS).unwrap();
    let mut preds: Vec<CpuPredictor> = (0..workers).map(|_| CpuPredictor { model: model.clone() }).collect();
    let mut refs: Vec<&mut dyn TilePredictor> = preds.iter_mut().map(|p| p as &mut dyn TilePredictor).collect();
    let (_, computed, _) = run_job(
        &mut refs,
        &JobSpec::full(&[&input], &[aff], Variant::Single, &plan),
        &out,
        &|_| {},
    )
    .unwrap();
    assert_eq!(computed, plan.count());
    out.into_data()
}

#[test]
fn several_predictor_workers_equal_one_bit_for_bit_and_resume_after_a_stop() {
    let model = shipped_model();
    let dims = [20, 70, 90];
    let vol = test_volume(dims, 14);
    let (unit, core) = ([4, 16, 16], [8, 32, 32]);
    let one = streamed_by(&model, &vol, unit, core, 1);
    let three = streamed_by(&model, &vol, unit, core, 3);
    assert!(one.iter().all(|v| v.is_finite()));
    let same = one
        .iter()
        .zip(&three)
        .filter(|(a, b)| a.to_bits() == b.to_bits())
        .count();
    assert_eq!(
        same,
        one.len(),
        "3 workers differ from 1 at {} voxels",
        one.len() - same
    );
    // a run of 2 workers stopped by its writer, then resumed by 2 workers: the
    // watermark (the written prefix) must not skip a tile finished out of order
    let (computed, skipped, count, got) = stop_then_resume(&model, &vol, unit, core, 2, 7);
    assert!(skipped <= 7 && skipped > 0, "skipped {skipped}");
    assert_eq!(computed + skipped, count);
    assert!(
        got.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()),
        "resumed 2-worker run differs from the 1-worker run"
    );
}

/// A CPU predictor on a pretend device: counts the tiles it predicts, and with
/// `prefetch` hands out tile k only after it has pulled tile k+1, as the CUDA predictor
/// does (overlapping the next upload with this compute).
struct CountedDevice {
    inner: CpuPredictor,
    prefetch: bool,
    tiles: Arc<AtomicUsize>,
}

impl TilePredictor for CountedDevice {
    fn describe(&self) -> String {
        "CPU as a device".into()
    }
    fn predict(&mut self, x: &Tensor<f32>) -> rln_engine::Result<Tensor<f32>> {
        self.tiles.fetch_add(1, Ordering::SeqCst);
        self.inner.predict(x)
    }
    fn bytes_per_voxel(&self) -> usize {
        320
    }
    fn predict_stream(
        &mut self,
        tiles: &mut dyn Iterator<Item = rln_engine::Result<Tensor<f32>>>,
        sink: &mut dyn FnMut(Tensor<f32>, &Tensor<f32>) -> rln_engine::Result<()>,
    ) -> rln_engine::Result<()> {
        let mut held: Option<(Tensor<f32>, Tensor<f32>)> = None;
        for t in tiles {
            let x = t?;
            let y = self.predict(&x)?;
            if let Some((px, py)) = held.take() {
                sink(px, &py)?;
            }
            if self.prefetch {
                held = Some((x, y));
            } else {
                sink(x, &y)?;
            }
        }
        if let Some((px, py)) = held {
            sink(px, &py)?;
        }
        Ok(())
    }
}

#[test]
fn blended_tiling_on_several_devices_equals_one_bit_for_bit_and_uses_each() {
    let model = shipped_model();
    let dims = [14, 60, 70];
    let vol = test_volume(dims, 16);
    let max_core = [8, 24, 24];
    let plan = TilePlan::new(dims, max_core, DEFAULT_OVERLAP, RECEPTIVE_RADIUS).unwrap();
    let mut cpu = CpuPredictor { model: model.clone() };
    let one = deconvolve(&mut cpu, &model, &vol, max_core).unwrap();
    assert!(one.data.iter().all(|v| v.is_finite()));
    // three devices: two that hand out each tile at once, one that holds a tile back
    let counts: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let mut devices: Vec<CountedDevice> = counts
        .iter()
        .enumerate()
        .map(|(i, c)| CountedDevice {
            inner: CpuPredictor { model: model.clone() },
            prefetch: i == 1,
            tiles: c.clone(),
        })
        .collect();
    let mut pool = PredictorPool::new(devices.iter_mut().map(|d| d as &mut dyn TilePredictor).collect()).unwrap();
    let three = deconvolve(&mut pool, &model, &vol, max_core).unwrap();
    let per_pool = pool.tiles_per_predictor();
    drop(pool);
    let per_device: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    // a pool of one is that predictor
    let mut alone = CpuPredictor { model: model.clone() };
    let mut single = PredictorPool::new(vec![&mut alone]).unwrap();
    let via_single = deconvolve(&mut single, &model, &vol, max_core).unwrap();
    assert_eq!(single.tiles_per_predictor(), vec![plan.count()]);
    assert!(via_single
        .data
        .iter()
        .zip(&one.data)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    eprintln!("{} tiles; per device {per_device:?}", plan.count());
    let same = one
        .data
        .iter()
        .zip(&three.data)
        .filter(|(a, b)| a.to_bits() == b.to_bits())
        .count();
    assert_eq!(
        same,
        one.len(),
        "3 devices differ from 1 at {} voxels",
        one.len() - same
    );
    assert_eq!(per_device.iter().sum::<usize>(), plan.count(), "every tile once");
    assert!(
        per_device.iter().all(|&n| n > 0),
        "a device got no tile: {per_device:?}"
    );
    assert_eq!(per_pool, per_device);
}

/// A device that fails on its second tile.
struct BrokenDevice {
    tiles: usize,
}

impl TilePredictor for BrokenDevice {
    fn describe(&self) -> String {
        "a broken device".into()
    }
    fn predict(&mut self, x: &Tensor<f32>) -> rln_engine::Result<Tensor<f32>> {
        self.tiles += 1;
        if self.tiles == 2 {
            return Err(rln_engine::Error::Cuda("the broken device failed".into()));
        }
        Tensor::from_vec(x.shape.with_c(1), x.data[..x.shape.len() / x.shape.c].to_vec())
    }
    fn bytes_per_voxel(&self) -> usize {
        4
    }
}

#[test]
fn a_failing_device_of_several_ends_the_blended_run_with_its_error() {
    let model = shipped_model();
    let vol = test_volume([10, 40, 40], 17);
    let mut cpu = CountedDevice {
        inner: CpuPredictor { model: model.clone() },
        prefetch: true,
        tiles: Arc::new(AtomicUsize::new(0)),
    };
    let mut broken = BrokenDevice { tiles: 0 };
    let mut pool = PredictorPool::new(vec![&mut cpu, &mut broken]).unwrap();
    let err = deconvolve(&mut pool, &model, &vol, [8, 16, 16]).unwrap_err();
    assert!(err.to_string().contains("the broken device failed"), "{err}");
}

/// A predictor whose device memory holds tiles of at most `max_voxels` input voxels:
/// larger ones fail with the out-of-memory error, as a GPU's would.
struct SmallDevice {
    inner: CpuPredictor,
    max_voxels: usize,
    refused: Arc<AtomicUsize>,
    largest: Arc<AtomicUsize>,
}

impl TilePredictor for SmallDevice {
    fn describe(&self) -> String {
        "CPU with a small memory".into()
    }
    fn predict(&mut self, x: &Tensor<f32>) -> rln_engine::Result<Tensor<f32>> {
        if x.shape.len() > self.max_voxels {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(rln_engine::Error::OutOfMemory(format!(
                "a tile of {} voxels",
                x.shape.len()
            )));
        }
        self.largest.fetch_max(x.shape.len(), Ordering::SeqCst);
        self.inner.predict(x)
    }
    fn bytes_per_voxel(&self) -> usize {
        320
    }
}

#[test]
fn out_of_memory_cuts_tiles_into_pieces_and_still_equals_deconvolve() {
    let model = shipped_model();
    let dims = [21, 67, 89];
    let vol = test_volume(dims, 15);
    let mut cpu = CpuPredictor { model: model.clone() };
    let reference = deconvolve(&mut cpu, &model, &vol, [24, 48, 48]).unwrap();
    let unit = [21, 32, 32];
    let input = MemoryVolume::new(dims, vol.data.clone()).unwrap().with_unit(unit);
    let aff = stats(&input, &model).affine();
    // windows of the plan are up to 21×68×68 = 97 104 voxels; the "device" holds 60 000
    let plan = CorePlan::new(dims, [21, 32, 32], RECEPTIVE_RADIUS).unwrap();
    let window: usize = plan.max_window().iter().product();
    let max_voxels = 60_000;
    assert!(window > max_voxels);
    for workers in [1usize, 2] {
        let out = MemoryVolume::new(dims, vec![f32::NAN; vol.len()])
            .unwrap()
            .with_unit(unit);
        let (refused, largest) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut preds: Vec<SmallDevice> = (0..workers)
            .map(|_| SmallDevice {
                inner: CpuPredictor { model: model.clone() },
                max_voxels,
                refused: refused.clone(),
                largest: largest.clone(),
            })
            .collect();
        let mut refs: Vec<&mut dyn TilePredictor> = preds.iter_mut().map(|p| p as &mut dyn TilePredictor).collect();
        run_job(
            &mut refs,
            &JobSpec::full(&[&input], &[aff], Variant::Single, &plan),
            &out,
            &|_| {},
        )
        .unwrap();
        let got = out.into_data();
        assert!(got.iter().all(|v| v.is_finite()), "a voxel was not written");
        let e = rel_l2(&got, &reference.data);
        let (r, l) = (refused.load(Ordering::SeqCst), largest.load(Ordering::SeqCst));
        eprintln!("{workers} worker(s): {r} tile(s) refused, pieces up to {l} voxels, rel L2 vs deconvolve {e:.2e}");
        assert!(r >= 1 && l <= max_voxels && l > 0);
        assert!(e <= 1e-6, "pieces vs in-memory rel err {e:e}");
    }
    // a device too small for any piece: a clear out-of-memory error naming the way out
    let out = MemoryVolume::new(dims, vec![f32::NAN; vol.len()])
        .unwrap()
        .with_unit(unit);
    let mut tiny = SmallDevice {
        inner: CpuPredictor { model: model.clone() },
        max_voxels: 1000,
        refused: Arc::new(AtomicUsize::new(0)),
        largest: Arc::new(AtomicUsize::new(0)),
    };
    let err = run_job(
        &mut [&mut tiny],
        &JobSpec::full(&[&input], &[aff], Variant::Single, &plan),
        &out,
        &|_| {},
    )
    .unwrap_err();
    assert!(err.is_out_of_memory() && err.to_string().contains("--tile"), "{err}");
}

#[test]
fn sampled_percentiles_see_every_depth_when_the_budget_is_below_a_plane() {
    // every plane a different brightness (10 per plane, plus the phantom's noise): a
    // sample of plane 0, or of a few planes, puts the percentiles far from the exact
    // ones (reading only plane 0 is off by ~98% of the range)
    let dims = [60usize, 256, 256];
    let base = test_volume(dims, 24);
    let plane = dims[1] * dims[2];
    let data: Vec<f32> = base
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| 10.0 * (i / plane) as f32 + (v - 100.0) / 400.0)
        .collect();
    let pct = [1.0, 99.0];
    for unit in [[1usize, 256, 256], [8, 64, 64]] {
        let r = MemoryVolume::new(dims, data.clone()).unwrap().with_unit(unit);
        let exact = sample_stats(&r, pct, usize::MAX).unwrap();
        // a budget of half a plane
        let s = sample_stats(&r, pct, plane / 2).unwrap();
        assert!(!s.exact && s.sampled_voxels <= plane / 2);
        let range = exact.p_hi_value - exact.p_lo_value;
        let e = ((s.p_lo_value - exact.p_lo_value).abs()).max((s.p_hi_value - exact.p_hi_value).abs()) / range;
        eprintln!(
            "unit {unit:?}: exact ({:.2}, {:.2}), sampled ({:.2}, {:.2}) from {} voxels: error {:.2}% of the range",
            exact.p_lo_value,
            exact.p_hi_value,
            s.p_lo_value,
            s.p_hi_value,
            s.sampled_voxels,
            100.0 * e
        );
        // the bound `infer --help` states
        assert!(
            e <= 0.01,
            "unit {unit:?}: sampled percentiles off by {:.2}% of the range",
            100.0 * e
        );
    }
}

// ------------------------------------------------------------------ the CLI

fn engine(args: &[&dyn AsRef<OsStr>]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rln-engine"))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `infer` of `vol` (written to DIR/in.tif) into DIR/out.tif on the CPU with `args`:
/// its JSON summary and the output volume.
fn cli_infer_tiff(dir: &Path, vol: &Volume, args: &[&str]) -> (serde_json::Value, Volume) {
    let (input, output) = (dir.join("in.tif"), dir.join("out.tif"));
    write_tiff(&input, vol);
    let mut argv: Vec<&dyn AsRef<OsStr>> =
        vec![&"infer", &MODEL, &input, &"-o", &output, &"--device", &"cpu", &"--json"];
    argv.extend(args.iter().map(|a| a as &dyn AsRef<OsStr>));
    let o = engine(&argv);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = serde_json::from_slice(&o.stdout).unwrap();
    (j, rln_engine::imaging::read_volume(&output).unwrap())
}

fn write_tiff(path: &Path, v: &Volume) {
    rln_engine::imaging::write_volume(path, v, rln_engine::imaging::OutputDtype::F32).unwrap();
}

#[test]
fn cli_tiff_to_tiff_equals_deconvolve_and_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [21, 67, 89];
    let vol = test_volume(dims, 14);
    let (j, got) = cli_infer_tiff(dir.path(), &vol, &["--tile", "16,32,32"]);
    assert_eq!(j["tiling"], "cores");
    assert!(j["tiles"].as_u64().unwrap() >= 8);
    assert_eq!(j["voxels"].as_u64().unwrap() as usize, vol.len());
    for k in ["read", "normalize", "transfer", "compute", "blend", "write"] {
        assert!(j["phases"][k].as_f64().is_some(), "phase {k} missing");
    }
    assert!(j["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    let model = shipped_model();
    let reference = deconvolve(&mut CpuPredictor { model: model.clone() }, &model, &vol, [24, 48, 48]).unwrap();
    let e = rel_l2(&got.data, &reference.data);
    assert!(e <= 1e-6, "CLI TIFF→TIFF vs deconvolve rel err {e:e}");
    // nothing but the input and the output are left in the folder
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

/// `infer --context 0` (the blended tiling, through the predictor pool) equals the
/// stitcher run directly with one CPU predictor on the same plan.
#[test]
fn cli_blended_tiling_equals_the_stitcher() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [24, 50, 60];
    let vol = test_volume(dims, 18);
    let (j, got) = cli_infer_tiff(dir.path(), &vol, &["--tile", "16,24,24", "--context", "0"]);
    assert_eq!(j["tiling"], "blended");
    let model = shipped_model();
    let plan = TilePlan::new(dims, [16, 24, 24], DEFAULT_OVERLAP, 0).unwrap();
    assert_eq!(j["tiles"].as_u64().unwrap() as usize, plan.count());
    let pct = model.config.norm_percentiles;
    let mut src = MemorySource { dims, data: &vol.data };
    let aff = estimate_normalization(&mut src, pct, usize::MAX).unwrap();
    let opts = StitchOptions {
        plan,
        normalize: NormalizeMode::Global,
        percentiles: pct,
        rescale_output: true,
        variant: model.config.variant,
    };
    let mut sink = MemorySink { data: Vec::new() };
    let mut views: Vec<&mut dyn PlaneSource> = vec![&mut src];
    run_tiled(
        &mut CpuPredictor { model: model.clone() },
        &mut views,
        &[aff],
        &mut sink,
        &opts,
        &mut |_, _| {},
    )
    .unwrap();
    let e = rel_l2(&got.data, &sink.data);
    assert!(e <= 1e-6, "CLI blended vs the stitcher rel err {e:e}");
}

#[test]
fn cli_constant_volume_is_copied() {
    let dir = tempfile::tempdir().unwrap();
    let vol = Volume::new([6, 20, 24], vec![37.5; 6 * 20 * 24]).unwrap();
    let input = dir.path().join("flat.tif");
    let output = dir.path().join("out.tif");
    write_tiff(&input, &vol);
    let o = engine(&[&"infer", &MODEL, &input, &"-o", &output, &"--device", &"cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("output is the input"), "{}", stderr(&o));
    let got = rln_engine::imaging::read_volume(&output).unwrap();
    assert_eq!(got.data, vol.data);
}

#[test]
fn cli_bad_blocks_and_outputs_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let vol = test_volume([6, 20, 24], 15);
    let input = dir.path().join("in.tif");
    write_tiff(&input, &vol);
    let out: PathBuf = dir.path().join("out.tif");
    for (block, needle) in [("3/2", "0 ≤ I < N"), ("0/0", "0 ≤ I < N"), ("1-2", "I/N")] {
        let o = engine(&[&"infer", &MODEL, &input, &"-o", &out, &"--block", &block]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(needle), "--block {block}: {}", stderr(&o));
    }
    let o = engine(&[&"infer", &MODEL, &input, &"-o", &out, &"--block", &"0/2"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("chunked store"), "{}", stderr(&o));
    let o = engine(&[&"infer", &MODEL, &input, &"-o", &input]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is the input"), "{}", stderr(&o));
    assert!(!out.exists());
    // a norm-stats file made for another shape
    let stats = dir.path().join("stats.json");
    let small = dir.path().join("small.tif");
    write_tiff(&small, &test_volume([4, 20, 24], 16));
    let o = engine(&[
        &"infer",
        &MODEL,
        &small,
        &"-o",
        &out,
        &"--device",
        &"cpu",
        &"--norm-stats",
        &stats,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_file(&out).unwrap();
    let o = engine(&[
        &"infer",
        &MODEL,
        &input,
        &"-o",
        &out,
        &"--device",
        &"cpu",
        &"--norm-stats",
        &stats,
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("made for an input of"), "{}", stderr(&o));
}

// ------------------------------------------------------------------ OME-Zarr stores

fn read_all(path: &Path) -> Vec<f32> {
    let r = rln_engine::imaging::stream::open_reader(path, &Default::default()).unwrap();
    let mut v = vec![0.0; r.dims().iter().product()];
    r.read_region(Region::whole(r.dims()), &mut v).unwrap();
    v
}

fn write_store(path: &Path, v: &Volume, chunks: [usize; 3], dtype: rln_engine::imaging::OutputDtype) {
    let spec = rln_engine::imaging::stream::WriterSpec {
        dims: v.dims,
        dtype,
        chunks: Some(chunks),
        voxel_size: Some([0.5, 0.2, 0.2]),
        metadata: None,
    };
    let w = rln_engine::imaging::stream::create_writer(path, &spec).unwrap();
    w.write_region(Region::whole(v.dims), &v.data).unwrap();
    w.finish().unwrap();
}

fn is_complete(store: &Path) -> bool {
    rln_engine::imaging::stream::zarr::is_complete(store).unwrap()
}

#[test]
fn cli_zarr_outputs_equal_deconvolve() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [21, 67, 89];
    let vol = test_volume(dims, 17);
    let tif = dir.path().join("in.tif");
    write_tiff(&tif, &vol);
    let zin = dir.path().join("in.zarr");
    // anisotropic chunks, not those of the output
    write_store(&zin, &vol, [5, 16, 40], rln_engine::imaging::OutputDtype::F32);
    let model = shipped_model();
    let reference = deconvolve(&mut CpuPredictor { model: model.clone() }, &model, &vol, [24, 48, 48]).unwrap();
    for (name, input) in [("tiff-to-zarr", &tif), ("zarr-to-zarr", &zin)] {
        let out = dir.path().join(format!("{name}.zarr"));
        let o = engine(&[
            &"infer",
            &MODEL,
            input,
            &"-o",
            &out,
            &"--device",
            &"cpu",
            &"--chunks",
            &"4,16,32",
            &"--tile",
            &"16,32,32",
        ]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(is_complete(&out), "{name}: a full run marks its store complete");
        let e = rel_l2(&read_all(&out), &reference.data);
        eprintln!("{name}: rel L2 vs deconvolve {e:.2e}");
        assert!(e <= 1e-6, "{name}: rel err {e:e}");
    }
}

#[test]
fn cli_blocks_of_a_store_equal_the_single_run_and_resume_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [20, 70, 90];
    let vol = test_volume(dims, 18);
    let input = dir.path().join("in.zarr");
    write_store(&input, &vol, [8, 32, 32], rln_engine::imaging::OutputDtype::U16);
    let common: [&dyn AsRef<OsStr>; 6] = [&"--device", &"cpu", &"--chunks", &"4,16,16", &"--tile", &"16,32,32"];
    let run = |out: &Path, extra: &[&dyn AsRef<OsStr>], env: Option<(&str, &str)>| -> Output {
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"infer", &MODEL, &input, &"-o", &out];
        args.extend_from_slice(&common);
        args.extend_from_slice(extra);
        let mut c = Command::new(env!("CARGO_BIN_EXE_rln-engine"));
        c.args(args.iter().map(|a| a.as_ref()));
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let single = dir.path().join("single.zarr");
    let o = run(&single, &[&"--json"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let tiles = j["tiles_total"].as_u64().unwrap();
    assert!(tiles >= 12, "{tiles} tiles");
    let single_data = read_all(&single);

    // split: create, then blocks in a scrambled order
    let split = dir.path().join("split.zarr");
    let stats = dir.path().join("stats.json");
    let o = run(&split, &[&"--create-only", &"--norm-stats", &stats], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stats.is_file() && split.join(".rln/plan.json").is_file());
    let n = 3;
    for i in [2usize, 0, 1] {
        assert!(!is_complete(&split), "blocks never mark the store complete");
        let b = format!("{i}/{n}");
        let o = run(&split, &[&"--block", &b, &"--norm-stats", &stats], None);
        assert!(o.status.success(), "block {b}: {}", stderr(&o));
        assert!(rln_engine::infer::stream::block_done(&split, i, n));
    }
    assert!(!is_complete(&split));
    let split_data = read_all(&split);
    assert!(
        split_data
            .iter()
            .zip(&single_data)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "the union of the blocks differs from the single run"
    );
    // --resume skips a done block
    let o = run(&split, &[&"--block", &"1/3", &"--resume"], None);
    assert!(
        o.status.success() && stderr(&o).contains("done already"),
        "{}",
        stderr(&o)
    );
    // a store planned for another run is refused
    let o = run(&split, &[&"--block", &"0/3", &"--percentiles", &"0.1,99.0"], None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("planned for another run"), "{}", stderr(&o));
    let other = dir.path().join("other.zarr");
    write_store(&other, &vol, [8, 32, 32], rln_engine::imaging::OutputDtype::F32);
    let o = run(&other, &[&"--block", &"0/3"], None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no run plan"), "{}", stderr(&o));

    // kill after 4 tiles, then resume
    let killed = dir.path().join("killed.zarr");
    let o = run(&killed, &[], Some(("RLN_TEST_STOP_AFTER_TILES", "4")));
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(!is_complete(&killed));
    let o = run(&killed, &[], None);
    assert!(!o.status.success() && stderr(&o).contains("--resume"), "{}", stderr(&o));
    let o = run(&killed, &[&"--resume", &"--json"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["tiles_skipped"].as_u64(), Some(4));
    assert_eq!(j["tiles"].as_u64(), Some(tiles - 4));
    assert!(is_complete(&killed));
    let resumed = read_all(&killed);
    assert!(
        resumed
            .iter()
            .zip(&single_data)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "the resumed run differs from the uninterrupted one"
    );
}

/// Peak resident memory of `infer` (the host pipeline, network replaced by a copy so
/// that the run is quick) at two depths 4× apart with the same tile: bounded memory
/// means the deeper volume (4× the bytes) does not raise the peak by its size.
#[test]
fn cli_peak_memory_does_not_grow_with_depth() {
    let dir = tempfile::tempdir().unwrap();
    let mut peaks = Vec::new();
    // both depths hold several full-depth tile windows (16 + 2·18 planes)
    let plane = [256usize, 256];
    for depth in [64usize, 256] {
        let dims = [depth, plane[0], plane[1]];
        let data: Vec<f32> = (0..dims.iter().product::<usize>())
            .map(|i| 100.0 + (i % 977) as f32)
            .collect();
        let vol = Volume::new(dims, data).unwrap();
        let input = dir.path().join(format!("in{depth}.zarr"));
        write_store(&input, &vol, [16, 64, 64], rln_engine::imaging::OutputDtype::U16);
        drop(vol);
        let out = dir.path().join(format!("out{depth}.zarr"));
        let o = engine(&[
            &"infer",
            &MODEL,
            &input,
            &"-o",
            &out,
            &"--copy-network",
            &"--tile",
            &"16,64,64",
            &"--chunks",
            &"16,64,64",
            &"--output-dtype",
            &"u16",
            &"--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let peak = j["peak_rss_bytes"].as_u64().unwrap();
        eprintln!("depth {depth}: peak RSS {:.1} MB", peak as f64 / 1e6);
        peaks.push(peak as f64);
    }
    // the deeper input is 192·256²·4 B = 50 MB of f32 more than the shallow one
    let grown = peaks[1] - peaks[0];
    assert!(
        grown < 0.2 * peaks[0] && grown < 15e6,
        "peak grew by {:.1} MB with depth",
        grown / 1e6
    );
}
