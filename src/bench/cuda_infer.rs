//! Forward throughput of the CUDA network (for `rln-engine bench --device cuda`): random
//! weights of realistic scale and a random input (never zeros), warm-up, then CUDA events
//! around each forward pass, median of many; per-kernel times from one more profiled
//! pass; peak device memory; and, separately, host-to-host time with transfers. The
//! forward pass is the network of `net` ([`Rln::infer`]) on [`CudaInferBackend`].

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{random_model, CuCheck, CudaDevice, CudaInferBackend, CudaOptions, DevTensor};
use crate::backend::Backend;
use crate::error::Result;
use crate::infer::cuda::predict_host;
use crate::net::Rln;
use crate::tensor::{Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Multiply-adds per output voxel (rln-spec §3: 8 780 at full resolution + 6 804 / 8).
pub const MACS_PER_VOXEL: f64 = 8780.0 + 6804.0 / 8.0;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub cuda: CudaOptions,
    /// Batch and volume: [n, d, h, w].
    pub dims: [usize; 4],
    pub warmup: usize,
    pub reps: usize,
    pub seed: u64,
    /// Also time each kernel (one extra profiled pass, median of `profile_reps`).
    pub per_kernel: bool,
    /// Also time host → device → host (upload, forward, download).
    pub host_to_host: bool,
}

impl BenchOptions {
    /// 256³, batch 1, 5 warm-up passes, 30 timed.
    pub fn new(cuda: CudaOptions) -> Self {
        BenchOptions {
            cuda,
            dims: [1, 256, 256, 256],
            warmup: 5,
            reps: 30,
            seed: 1,
            per_kernel: true,
            host_to_host: true,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelTime {
    pub kernel: String,
    pub median_ms: f64,
    /// Fraction of the summed kernel times.
    pub share: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    /// "f32", "f16" (FP32 cores) or "f16-tc" (tensor cores).
    pub mode: String,
    pub dims: [usize; 4],
    pub reps: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Output voxels per second of the forward pass (median).
    pub voxels_per_s: f64,
    /// Useful arithmetic rate (2 × MACS_PER_VOXEL per voxel).
    pub tflops: f64,
    /// Peak device memory held by the engine (weights + workspace), bytes.
    pub peak_mem_bytes: usize,
    /// Non-finite values in the prediction (must be 0).
    pub nonfinite: usize,
    pub kernels: Vec<KernelTime>,
    /// Host-to-host voxels/s (median of 3), when measured.
    pub host_to_host_voxels_per_s: Option<f64>,
    /// How the kernel modules were loaded.
    pub modules: Vec<(String, String)>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Runs the benchmark.
pub fn run(o: &BenchOptions) -> Result<BenchReport> {
    let dev = CudaDevice::open(o.cuda.device)?;
    let model = random_model(o.seed);
    let b = CudaInferBackend::new(dev.clone(), &model, o.cuda)?;
    let net = Rln::new(&b, b.model());
    let forward = |x: &DevTensor| -> Result<DevTensor> { Ok(net.infer(x, false)?.prediction) };
    let [n, d, h, w] = o.dims;
    let shape = Shape::new(n, 1, d, h, w);
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed + 1);
    let x = Tensor::from_vec(shape, (0..shape.len()).map(|_| rng.random_range(0.0f32..1.0)).collect())?;
    // padded on the host, as the streaming predictor does
    let xb = b.from_host(&CpuBackend::<f32>::new().pad_even(&x)?)?;
    for _ in 0..o.warmup.max(1) {
        forward(&xb)?;
    }
    dev.compute.synchronize().check("warm-up forward passes")?;

    let (start, end) = (dev.event(true)?, dev.event(true)?);
    let mut times = Vec::with_capacity(o.reps);
    let mut y = None;
    for _ in 0..o.reps.max(1) {
        start.record(&dev.compute).check("recording an event")?;
        y = Some(forward(&xb)?);
        end.record(&dev.compute).check("recording an event")?;
        times.push(start.elapsed_ms(&end).check("timing a forward pass")? as f64);
    }
    let (min_ms, max_ms) = times.iter().fold((f64::MAX, 0.0f64), |(a, b), &t| (a.min(t), b.max(t)));
    let median_ms = median(&mut times);
    let voxels = shape.len() as f64;

    let y = b.to_host(&y.expect("at least one pass"))?;
    let nonfinite = y.data.iter().filter(|v| !v.is_finite()).count();

    let mut kernels = Vec::new();
    if o.per_kernel {
        let mut per: Vec<(String, Vec<f64>)> = Vec::new();
        for _ in 0..5 {
            b.start_profile();
            forward(&xb)?;
            for (i, (k, ms)) in b.take_profile()?.into_iter().enumerate() {
                if per.len() <= i {
                    per.push((k, Vec::new()));
                }
                per[i].1.push(ms);
            }
        }
        let meds: Vec<(String, f64)> = per.into_iter().map(|(k, mut v)| (k, median(&mut v))).collect();
        let total: f64 = meds.iter().map(|(_, m)| m).sum();
        kernels = meds
            .into_iter()
            .map(|(kernel, median_ms)| KernelTime {
                kernel,
                median_ms,
                share: median_ms / total,
            })
            .collect();
    }
    let peak_mem_bytes = b.runtime().mem_bytes().1;

    let host_to_host_voxels_per_s = if o.host_to_host {
        let mut t = Vec::new();
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            predict_host(&b, &x, false)?;
            t.push(t0.elapsed().as_secs_f64());
        }
        Some(voxels / median(&mut t))
    } else {
        None
    };

    Ok(BenchReport {
        device: dev.describe(),
        mode: o.cuda.label().to_string(),
        dims: o.dims,
        reps: o.reps,
        median_ms,
        min_ms,
        max_ms,
        voxels_per_s: voxels / (median_ms * 1e-3),
        tflops: 2.0 * MACS_PER_VOXEL * voxels / (median_ms * 1e-3) * 1e-12,
        peak_mem_bytes,
        nonfinite,
        kernels,
        host_to_host_voxels_per_s,
        modules: dev
            .module_sources
            .iter()
            .map(|(a, b)| (a.clone(), b.to_string()))
            .collect(),
    })
}

impl BenchReport {
    /// A short human-readable table.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let [n, d, h, w] = self.dims;
        let _ = writeln!(
            s,
            "{} {}  {n}×{d}×{h}×{w}: median {:.2} ms (min {:.2}, max {:.2}, {} reps)",
            self.device, self.mode, self.median_ms, self.min_ms, self.max_ms, self.reps
        );
        let _ = writeln!(
            s,
            "  {:.3} Gvoxel/s, {:.1} TFLOP/s useful, peak memory {:.0} MiB, non-finite outputs {}",
            self.voxels_per_s * 1e-9,
            self.tflops,
            self.peak_mem_bytes as f64 / (1u64 << 20) as f64,
            self.nonfinite
        );
        if let Some(v) = self.host_to_host_voxels_per_s {
            let _ = writeln!(s, "  host-to-host (padding, copies, forward): {:.3} Gvoxel/s", v * 1e-9);
        }
        for k in &self.kernels {
            let _ = writeln!(
                s,
                "  {:<26} {:>8.3} ms {:>5.1}%",
                k.kernel,
                k.median_ms,
                100.0 * k.share
            );
        }
        s
    }
}
