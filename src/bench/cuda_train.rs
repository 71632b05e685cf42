//! Training-step benchmark of the CUDA backend (`gpu_tool train-bench`): the authors'
//! initialization, a batch of smooth random volumes (never zeros), warm-up steps, then
//! complete steps ([`train_step_on`]: upload, forward with batch statistics, loss,
//! backward, the host's Adam and running statistics) timed with CUDA events on the
//! backend's stream and with the host clock, median of many; then one profiled step whose
//! per-kernel times are summed by phase (what the device computes vs the step's wall time:
//! the rest is host work and synchronization gaps).

use super::TRAIN_FLOPS_PER_VOXEL;
use crate::backend::cuda::{CuCheck, CudaTrainBackend};
use crate::error::{Error, Result};
use crate::model::{Model, ModelConfig};
use crate::tensor::{Shape, Tensor};
use crate::train::trainer::{train_step_on, TrainConfig, TrainState};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TrainBenchOptions {
    /// Batch and crop: [n, d, h, w] (the authors': 4 × 64³).
    pub dims: [usize; 4],
    pub warmup: usize,
    pub steps: usize,
    pub seed: u64,
}

impl Default for TrainBenchOptions {
    fn default() -> Self {
        TrainBenchOptions {
            dims: [4, 64, 64, 64],
            warmup: 5,
            steps: 40,
            seed: 1,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainBenchResult {
    pub device: String,
    /// Arithmetic of the convs (`fp32` or `mixed`: the backend's setting).
    pub precision: crate::backend::TrainPrecision,
    pub dims: [usize; 4],
    pub warmup: usize,
    pub steps: usize,
    /// Median step time between CUDA events recorded before and after the step (s).
    pub step_s: f64,
    pub step_min_s: f64,
    pub step_max_s: f64,
    /// Median host wall time of a step (s).
    pub host_step_s: f64,
    /// Kernel time of one profiled step, summed (s), and by phase and kernel (ms).
    pub kernel_s: f64,
    pub phases_ms: BTreeMap<String, f64>,
    pub kernels_ms: Vec<(String, f64)>,
    pub launches: usize,
    /// FLOP of a step (rln-spec §3 MACs × 3 minus the data gradients not needed) / step_s.
    pub tflops: f64,
    pub voxels_per_s: f64,
    pub peak_mem_bytes: usize,
    pub loss_first: f64,
    pub loss_last: f64,
}

impl TrainBenchResult {
    pub fn table(&self) -> String {
        let [n, d, h, w] = self.dims;
        let mut s = format!(
            "train step {n}×{d}×{h}×{w} ({}) on {}: median {:.2} ms (min {:.2}, max {:.2}; host clock {:.2} ms) over {} steps, \
             {:.2} TFLOP/s, {:.3e} voxels/s, peak {} MiB; loss {:.4} → {:.4}\n",
            self.precision,
            self.device,
            self.step_s * 1e3,
            self.step_min_s * 1e3,
            self.step_max_s * 1e3,
            self.host_step_s * 1e3,
            self.steps,
            self.tflops,
            self.voxels_per_s,
            self.peak_mem_bytes >> 20,
            self.loss_first,
            self.loss_last
        );
        s.push_str(&format!(
            "kernels of one step: {:.2} ms in {} launches ({:.0}% of the step); by phase: {}\n",
            self.kernel_s * 1e3,
            self.launches,
            100.0 * self.kernel_s / self.step_s,
            self.phases_ms
                .iter()
                .map(|(k, v)| format!("{k} {v:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        s.push_str("slowest kernels (ms, summed over launches): ");
        s.push_str(
            &self
                .kernels_ms
                .iter()
                .take(10)
                .map(|(k, v)| format!("{k} {v:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        s.push('\n');
        s
    }
}

/// A batch of smooth random volumes in [0, 1) and a ground truth made from it (a
/// sharpened, shifted copy), as a data loader would give (normalized).
pub fn bench_batch(shape: Shape, seed: u64) -> (Tensor<f32>, Tensor<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut g = Tensor::<f32>::zeros(shape);
    for n in 0..shape.n {
        let blobs: Vec<([f32; 3], f32)> = (0..24)
            .map(|_| {
                (
                    [
                        rng.random_range(0.0..shape.d as f32),
                        rng.random_range(0.0..shape.h as f32),
                        rng.random_range(0.0..shape.w as f32),
                    ],
                    rng.random_range(0.2f32..1.0),
                )
            })
            .collect();
        let p = g.plane_mut(n, 0);
        for z in 0..shape.d {
            for y in 0..shape.h {
                for x in 0..shape.w {
                    let mut v = 0.02f32;
                    for (c, a) in &blobs {
                        let d2 = (z as f32 - c[0]).powi(2) + (y as f32 - c[1]).powi(2) + (x as f32 - c[2]).powi(2);
                        if d2 < 64.0 {
                            v += a * (-d2 / 6.0).exp();
                        }
                    }
                    p[(z * shape.h + y) * shape.w + x] = v;
                }
            }
        }
    }
    let x = Tensor {
        shape,
        data: g.data.iter().map(|&v| 0.6 * v + rng.random_range(0.0..0.08)).collect(),
    };
    (x, g)
}

/// The phase of a launch: forward until the loss's first kernel, then loss, then backward.
fn phase(name: &str, stage: &mut u8) -> String {
    if name == "t_loss_sums" && *stage == 0 {
        *stage = 1;
    }
    let after_loss = *stage == 2;
    if name == "t_loss_grad" {
        *stage = 2;
        return "loss".into();
    }
    match *stage {
        0 => {
            if name.starts_with("tconv_fwd") {
                "fwd.conv".into()
            } else {
                "fwd.other".into()
            }
        }
        1 => "loss".into(),
        _ => {
            debug_assert!(after_loss);
            if name.starts_with("tconv_fwd") {
                "bwd.conv_data".into()
            } else if name.starts_with("tconv_wgrad") || name == "t_up2_wgrad" {
                "bwd.conv_weight".into()
            } else if name == "t_reduce_part" {
                "bwd.reduce".into()
            } else {
                "bwd.other".into()
            }
        }
    }
}

/// Sums a profile by phase and by kernel (slowest first).
pub fn summarize(profile: &[(String, f64)]) -> (BTreeMap<String, f64>, Vec<(String, f64)>) {
    let mut phases = BTreeMap::new();
    let mut kernels: BTreeMap<String, f64> = BTreeMap::new();
    let mut stage = 0u8;
    for (name, ms) in profile {
        *phases.entry(phase(name, &mut stage)).or_insert(0.0) += ms;
        *kernels.entry(name.clone()).or_insert(0.0) += ms;
    }
    let mut k: Vec<(String, f64)> = kernels.into_iter().collect();
    k.sort_by(|a, b| b.1.total_cmp(&a.1));
    (phases, k)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

pub fn run(b: &CudaTrainBackend, o: &TrainBenchOptions) -> Result<TrainBenchResult> {
    let [n, d, h, w] = o.dims;
    let shape = Shape::new(n, 1, d, h, w);
    let cfg = TrainConfig::default();
    let mut state = TrainState::new(Model::<f32>::init(ModelConfig::default(), o.seed), &cfg);
    // two batches alternate, so that no step sees exactly the previous step's data
    let batches = [bench_batch(shape, o.seed), bench_batch(shape, o.seed + 1)];
    let stream = b
        .stream()
        .ok_or_else(|| Error::invalid("the training benchmark needs a CUDA device"))?
        .clone();
    let dev = b.device().expect("a device with a stream").clone();
    let mut losses = Vec::new();
    for i in 0..o.warmup {
        let (x, g) = &batches[i % 2];
        losses.push(train_step_on(b, &mut state, &cfg, x, g)?.loss);
    }
    b.synchronize()?;
    b.reset_peak();
    let (mut dev_t, mut host_t) = (Vec::new(), Vec::new());
    for i in 0..o.steps {
        let (x, g) = &batches[i % 2];
        let e0 = dev.event(true)?;
        let e1 = dev.event(true)?;
        let t0 = Instant::now();
        e0.record(&stream).check("recording an event")?;
        losses.push(train_step_on(b, &mut state, &cfg, x, g)?.loss);
        e1.record(&stream).check("recording an event")?;
        e1.synchronize().check("waiting for a step")?;
        host_t.push(t0.elapsed().as_secs_f64());
        dev_t.push(e0.elapsed_ms(&e1).check("reading a step's time")? as f64 * 1e-3);
    }
    let (_, peak) = b.mem_bytes();
    b.start_profile();
    let (x, g) = &batches[0];
    train_step_on(b, &mut state, &cfg, x, g)?;
    let profile = b.take_profile()?;
    let (phases_ms, kernels_ms) = summarize(&profile);
    let kernel_s = profile.iter().map(|(_, ms)| ms).sum::<f64>() * 1e-3;
    let step_min_s = dev_t.iter().copied().fold(f64::INFINITY, f64::min);
    let step_max_s = dev_t.iter().copied().fold(0.0, f64::max);
    let step_s = median(&mut dev_t);
    let voxels = shape.n * shape.spatial();
    Ok(TrainBenchResult {
        device: b.describe(),
        precision: b.precision(),
        dims: o.dims,
        warmup: o.warmup,
        steps: o.steps,
        step_s,
        step_min_s,
        step_max_s,
        host_step_s: median(&mut host_t),
        kernel_s,
        phases_ms,
        kernels_ms,
        launches: profile.len(),
        tflops: TRAIN_FLOPS_PER_VOXEL * voxels as f64 / step_s * 1e-12,
        voxels_per_s: voxels as f64 / step_s,
        peak_mem_bytes: peak,
        loss_first: losses.first().copied().unwrap_or(f64::NAN),
        loss_last: losses.last().copied().unwrap_or(f64::NAN),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_phases_follow_the_step() {
        let p: Vec<(String, f64)> = [
            ("t_reshape", 1.0),
            ("tconv_fwd_1_0_0_4", 2.0),
            ("t_chan_sum", 0.5),
            ("t_loss_sums", 0.1),
            ("t_reduce_part", 0.1),
            ("t_loss_sums", 0.1),
            ("t_loss_grad", 0.2),
            ("t_epi_bwd1", 0.3),
            ("t_reduce_part", 0.1),
            ("tconv_wgrad_8_8_0_8", 4.0),
            ("tconv_fwd_8_0_0_8", 3.0),
            ("t_up2_wgrad", 1.0),
        ]
        .iter()
        .map(|(n, t)| (n.to_string(), *t))
        .collect();
        let (ph, k) = summarize(&p);
        assert_eq!(ph["fwd.conv"], 2.0);
        assert_eq!(ph["fwd.other"], 1.5);
        assert!((ph["loss"] - 0.5).abs() < 1e-12);
        assert_eq!(ph["bwd.conv_weight"], 5.0);
        assert_eq!(ph["bwd.conv_data"], 3.0);
        assert_eq!(ph["bwd.reduce"], 0.1);
        assert_eq!(ph["bwd.other"], 0.3);
        assert_eq!(k[0], ("tconv_wgrad_8_8_0_8".to_string(), 4.0));
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn bench_batch_is_finite_and_not_constant() {
        let (x, g) = bench_batch(Shape::new(2, 1, 8, 8, 8), 3);
        assert!(x.all_finite() && g.all_finite());
        let (lo, hi) = x
            .data
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert!(lo >= 0.0 && hi > lo + 0.1, "{lo} {hi}");
    }
}
