//! `rln-engine bench`: throughput of the engine's main paths, measured the same way
//! every time (warm-up, then the median of repeated runs). The CPU paths are here;
//! [`cuda_infer`] and [`cuda_train`] measure the CUDA network and training step.

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, GradMode};
use crate::model::{Model, ModelConfig};
use crate::net::{BnMode, Rln};
use crate::tensor::{Shape, Tensor};
use serde::Serialize;
use std::time::{Duration, Instant};

pub mod cuda_infer;
pub mod cuda_train;

/// Multiply-adds per output voxel of the forward pass (spec §3): 8 780 at full
/// resolution + 6 804 at half resolution / 8.
pub const FORWARD_MACS_PER_VOXEL: f64 = 8780.0 + 6804.0 / 8.0;
pub const FORWARD_FLOPS_PER_VOXEL: f64 = 2.0 * FORWARD_MACS_PER_VOXEL;
/// A training step's convolution work: forward, data gradient and weight gradient (the
/// data gradient of the two convs reading the input is skipped: 2·(4·27) MACs/voxel
/// at full and half resolution).
pub const TRAIN_FLOPS_PER_VOXEL: f64 = 3.0 * FORWARD_FLOPS_PER_VOXEL - 2.0 * (108.0 + 108.0 / 8.0);

#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// What was measured, e.g. "forward 4×64³".
    pub name: String,
    /// Work items per run (voxels, or voxel-iterations).
    pub items: f64,
    pub unit: String,
    /// Median seconds per run.
    pub seconds: f64,
    /// items / seconds.
    pub throughput: f64,
    /// Implied arithmetic rate, where the work is known.
    pub gflops: Option<f64>,
    pub runs: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub threads: usize,
    pub isa: String,
    pub rows: Vec<BenchRow>,
}

/// Runs `f` once to warm up, then repeatedly for at least `min_runs` runs and
/// `min_time`, and returns the median duration and the number of runs (or the first
/// error of `f`).
pub fn time_median(
    min_runs: usize,
    min_time: Duration,
    mut f: impl FnMut() -> crate::Result<()>,
) -> crate::Result<(f64, usize)> {
    f()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_runs || start.elapsed() < min_time {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
        if times.len() >= 1000 {
            break;
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok((times[times.len() / 2], times.len()))
}

pub fn row(name: String, items: f64, unit: &str, seconds: f64, flops_per_item: Option<f64>, runs: usize) -> BenchRow {
    BenchRow {
        name,
        items,
        unit: unit.to_string(),
        seconds,
        throughput: items / seconds,
        gflops: flops_per_item.map(|f| f * items / seconds / 1e9),
        runs,
    }
}

/// A random (but realistic) model and input: weights as the authors' initialization,
/// input positive like normalized microscopy data. Throughput does not depend on values.
fn bench_inputs(shape: Shape, seed: u64) -> (Model<f32>, Tensor<f32>, Tensor<f32>) {
    let model = Model::<f32>::init(ModelConfig::default(), seed);
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    let x = Tensor::from_vec(shape, (0..shape.len()).map(|_| rnd()).collect()).unwrap();
    let g = Tensor::from_vec(shape, (0..shape.len()).map(|_| rnd()).collect()).unwrap();
    (model, x, g)
}

/// Forward (inference mode) and forward+backward (one training step without the
/// optimizer) of the CPU network on `shape`.
pub fn cpu_network(shape: Shape, min_runs: usize, min_time: Duration) -> crate::Result<Vec<BenchRow>> {
    let (model, x, g) = bench_inputs(shape, 1);
    let b = CpuBackend::<f32>::new();
    let net = Rln::new(&b, &model);
    let voxels = (shape.n * shape.spatial()) as f64;
    let label = format!("{}×{}×{}×{}", shape.n, shape.d, shape.h, shape.w);
    let (t_fwd, n_fwd) = time_median(min_runs, min_time, || {
        std::hint::black_box(net.forward(&x, BnMode::Running, false)?);
        Ok(())
    })?;
    let (t_step, n_step) = time_median(min_runs, min_time, || {
        let f = net.forward(&x, BnMode::Batch, true)?;
        let (_, dy, de) = b.loss(&f.prediction, &f.e1_raw, &x, &g)?;
        std::hint::black_box(net.backward(&f, &dy, &de, GradMode::Paper)?);
        Ok(())
    })?;
    Ok(vec![
        row(
            format!("forward {label}"),
            voxels,
            "voxel",
            t_fwd,
            Some(FORWARD_FLOPS_PER_VOXEL),
            n_fwd,
        ),
        row(
            format!("forward+backward {label}"),
            voxels,
            "voxel",
            t_step,
            Some(TRAIN_FLOPS_PER_VOXEL),
            n_step,
        ),
    ])
}

/// Tiled inference (crop and stitch with the default overlap and context) of one
/// `dims` volume through `pred`, normalization included; cores of at most `core`.
pub fn tiled_inference(
    pred: &mut dyn crate::infer::TilePredictor,
    dims: [usize; 3],
    core: [usize; 3],
    min_runs: usize,
    min_time: Duration,
) -> crate::Result<BenchRow> {
    use crate::infer::tiling::{TilePlan, DEFAULT_OVERLAP, RECEPTIVE_RADIUS};
    let shape = Shape::new(1, 1, dims[0], dims[1], dims[2]);
    // `deconvolve` reads only the model's config (percentiles, variant); the weights
    // that run are the predictor's own.
    let (model, x, _) = bench_inputs(shape, 3);
    let volume = crate::imaging::Volume::new(dims, x.data)?;
    let tiles = TilePlan::new(dims, core, DEFAULT_OVERLAP, RECEPTIVE_RADIUS)?.count();
    let (t, runs) = time_median(min_runs, min_time, || {
        std::hint::black_box(crate::infer::deconvolve(pred, &model, &volume, core)?);
        Ok(())
    })?;
    let vox = (dims[0] * dims[1] * dims[2]) as f64;
    Ok(row(
        format!("tiled inference {}×{}×{} ({tiles} tiles)", dims[0], dims[1], dims[2]),
        vox,
        "voxel",
        t,
        Some(FORWARD_FLOPS_PER_VOXEL),
        runs,
    ))
}

/// Network-only throughput of `infer`'s streaming tiling: the predictor alone on every
/// window of the cores plan of a `dims` volume (cores of `core`, `context` voxels
/// around, as [`crate::infer::stream::plan::CorePlan`] makes them), with no reading,
/// normalization, cropping or writing. Each distinct window shape is timed (median of
/// runs after a warm-up) and weighted by its count; throughput is core voxels per
/// second, directly comparable to `infer --json`'s `voxels_per_s` on the same plan.
pub fn stream_network_only(
    pred: &mut dyn crate::infer::TilePredictor,
    dims: [usize; 3],
    core: [usize; 3],
    context: usize,
    min_runs: usize,
    min_time: Duration,
) -> crate::Result<BenchRow> {
    use crate::infer::stream::plan::CorePlan;
    let plan = CorePlan::new(dims, core, context)?;
    let mut shapes: std::collections::BTreeMap<[usize; 3], usize> = Default::default();
    for k in 0..plan.count() {
        *shapes.entry(plan.tile(k).window.shape).or_default() += 1;
    }
    let mut total = 0.0;
    let mut runs = usize::MAX;
    for (i, (&[d, h, w], &count)) in shapes.iter().enumerate() {
        let shape = Shape::new(1, 1, d, h, w);
        let (_, x, _) = bench_inputs(shape, 5 + i as u64);
        let (t, n) = time_median(min_runs, min_time, || {
            std::hint::black_box(pred.predict(&x)?);
            Ok(())
        })?;
        total += t * count as f64;
        runs = runs.min(n);
    }
    let vox = (dims[0] * dims[1] * dims[2]) as f64;
    Ok(row(
        format!(
            "network-only tiles {}×{}×{} ({} tiles, cores {}×{}×{}, context {context})",
            dims[0],
            dims[1],
            dims[2],
            plan.count(),
            plan.core[0],
            plan.core[1],
            plan.core[2]
        ),
        vox,
        "voxel",
        total,
        None,
        runs,
    ))
}

/// One complete training step (forward, loss, backward, Adam, running statistics) on a
/// batch of `shape`.
pub fn train_step(shape: Shape, min_runs: usize, min_time: Duration) -> crate::Result<BenchRow> {
    use crate::train::trainer::{train_step, TrainConfig, TrainState};
    let (model, x, g) = bench_inputs(shape, 4);
    let cfg = TrainConfig::default();
    let mut state = TrainState::new(model, &cfg);
    let (t, runs) = time_median(min_runs, min_time, || {
        train_step(&mut state, &cfg, &x, &g)?;
        Ok(())
    })?;
    let label = format!("train step {}×{}×{}×{}", shape.n, shape.d, shape.h, shape.w);
    Ok(row(
        label,
        (shape.n * shape.spatial()) as f64,
        "voxel",
        t,
        Some(TRAIN_FLOPS_PER_VOXEL),
        runs,
    ))
}

/// Classical Richardson–Lucy on a 64×256×256 volume (31³ PSF), in voxel-iterations/s.
pub fn richardson_lucy(iterations: usize) -> crate::Result<BenchRow> {
    let r = crate::imaging::rl::measure_throughput(iterations)?;
    let [d, h, w] = r.dims;
    let items = (d * h * w * r.iterations) as f64;
    Ok(row(
        format!("Richardson–Lucy {d}×{h}×{w}, {} it.", r.iterations),
        items,
        "voxel·it",
        r.seconds,
        None,
        1,
    ))
}

/// The CPU model name from /proc/cpuinfo, if there is one.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

pub fn print_report(r: &BenchReport) {
    println!("{} — {} threads, {}", r.device, r.threads, r.isa);
    println!(
        "{:<34} {:>10} {:>16} {:>10} {:>6}",
        "case", "median s", "throughput", "GFLOP/s", "runs"
    );
    for row in &r.rows {
        let g = row.gflops.map(|g| format!("{g:.1}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<34} {:>10.4} {:>11.3e} {}/s {:>10} {:>6}",
            row.name, row.seconds, row.throughput, row.unit, g, row.runs
        );
    }
}
