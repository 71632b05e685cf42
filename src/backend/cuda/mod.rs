//! The CUDA backend: inference (the network of `net`, whose fused stages run as 16 fused
//! kernels) and training (every op of the backend interface), kernels/*.cu compiled by
//! build.rs and embedded, driven through cudarc. Its benchmarks and conformance run live
//! with their users (`crate::bench`, `crate::conformance`).
//!
//! - [`CudaInferBackend`]: inference: [`crate::backend::Backend::stage`] on the fused
//!   kernels (weights folded and packed once, f32 or f16 storage), the stages they do
//!   not cover (dual-view inputs) composed of the training kernels.
//! - [`CudaPredictor`]: the device side of streaming tiles (the infer layer makes it a
//!   `TilePredictor`), overlapping the transfers of one tile with the compute of the
//!   previous one.
//! - [`available`]: whether a CUDA device can be used at all (for `--device auto`).
//! - [`CudaTrainBackend`]: training: every op of [`crate::backend::Backend`] and its
//!   gradient on the device (kernels/train_*.cu), so the generic network trains on the GPU.
//! - [`runtime`]: the one runtime both run on: the executor of the compute stream
//!   (allocations, copies, launches with either parameter block, profiling) and the
//!   launch trace (trace_tests.rs compares it with tests/data/launch-trace/).
//!
//! Layout: activations are channels-last on the device (N·D·H·W voxels × C); tensors of
//! one channel are always f32, those of several channels f32 or f16 ([`Precision`]).
//! Every kernel has a CPU twin ([`twin`]) and a differential test (tests/gpu.rs); the
//! host-side index math and weight layouts are also checked without a GPU by line-by-line
//! emulations of the kernels (emulate.rs, emulate_train.rs, emulate_infer.rs: unit tests),
//! on which the whole inference network and training step run.

pub mod device;
#[cfg(test)]
mod emulate;
#[cfg(test)]
mod emulate_infer;
#[cfg(test)]
mod emulate_tile;
#[cfg(test)]
mod emulate_train;
#[cfg(test)]
mod emulate_train_mma;
pub mod infer;
pub mod kernels;
pub mod launch;
pub mod params;
pub mod predictor;
pub mod runtime;
#[cfg(test)]
mod trace_tests;
pub mod train;
pub mod train_launch;
pub mod twin;
pub mod weights;

pub use device::{CuCheck, CudaDevice};
pub use infer::CudaInferBackend;
pub use predictor::CudaPredictor;
pub use runtime::{DevTensor, Runtime};
pub use train::CudaTrainBackend;

use crate::model::{LayerOp, Model, ModelConfig, LAYERS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Storage type of the multi-channel activations (arithmetic is f32 in every one).
/// Bf16 keeps f32's exponent range with 8 significant bits (fp16: 11, but a largest
/// value of 65 504): the choice for models whose activations overflow fp16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

/// How to run the network on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaOptions {
    /// CUDA device ordinal.
    pub device: usize,
    pub precision: Precision,
    /// f16 and bf16 only: every conv on the tensor cores (mma.sync m16n8k16, the 1-channel
    /// inputs of the 1→k convs rounded to the storage type too); otherwise every conv on
    /// the FP32 cores.
    pub tensor_cores: bool,
    /// Synchronize after every launch, so that an asynchronous fault is reported with
    /// the kernel that caused it (slower; also set by RLN_CUDA_SYNC=1).
    pub sync_each_launch: bool,
}

impl Precision {
    /// Bytes a value is stored in.
    pub const fn bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::F16 | Precision::Bf16 => 2,
        }
    }
    /// The kernels' name suffix of this storage type ("f32", "f16", "bf16").
    pub const fn suffix(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }
    /// The value as this storage type rounds it (round to nearest even, as the kernels'
    /// cvt.rn), back in f32.
    pub fn round(self, v: f32) -> f32 {
        match self {
            Precision::F32 => v,
            Precision::F16 => half::f16::from_f32(v).to_f32(),
            Precision::Bf16 => half::bf16::from_f32(v).to_f32(),
        }
    }
    /// The 16-bit pattern of `v` in this (2-byte) storage type, rounded to nearest even.
    pub fn bits16(self, v: f32) -> u16 {
        match self {
            Precision::F16 => half::f16::from_f32(v).to_bits(),
            Precision::Bf16 => half::bf16::from_f32(v).to_bits(),
            Precision::F32 => panic!("f32 is not a 16-bit storage type"),
        }
    }
    /// The value of a 16-bit pattern of this storage type.
    pub fn from_bits16(self, b: u16) -> f32 {
        match self {
            Precision::F16 => half::f16::from_bits(b).to_f32(),
            Precision::Bf16 => half::bf16::from_bits(b).to_f32(),
            Precision::F32 => panic!("f32 is not a 16-bit storage type"),
        }
    }
}

impl CudaOptions {
    /// The default options of a storage precision (tensor cores on for 16-bit storage).
    pub fn of(p: Precision) -> Self {
        match p {
            Precision::F32 => Self::f32(),
            Precision::F16 => Self::f16(),
            Precision::Bf16 => Self::bf16(),
        }
    }
    pub fn f32() -> Self {
        CudaOptions {
            device: 0,
            precision: Precision::F32,
            tensor_cores: false,
            sync_each_launch: sync_from_env(),
        }
    }
    /// f16 storage with the tensor-core convs.
    pub fn f16() -> Self {
        CudaOptions {
            device: 0,
            precision: Precision::F16,
            tensor_cores: true,
            sync_each_launch: sync_from_env(),
        }
    }
    /// bf16 storage with the tensor-core convs (bf16 operands, f32 accumulation).
    pub fn bf16() -> Self {
        CudaOptions {
            precision: Precision::Bf16,
            ..Self::f16()
        }
    }
    pub fn with_tensor_cores(self, on: bool) -> Self {
        CudaOptions {
            tensor_cores: on,
            ..self
        }
    }
    pub fn is_f16(&self) -> bool {
        self.precision == Precision::F16
    }
    /// 16-bit storage (f16 or bf16).
    pub fn is_half(&self) -> bool {
        self.precision != Precision::F32
    }
    /// Whether the tensor-core kernels run (16-bit storage and `tensor_cores`).
    pub fn uses_mma(&self) -> bool {
        self.is_half() && self.tensor_cores
    }
    /// The options of a [`CudaOptions::label`] ("f32", "f16", "f16-tc", "bf16", "bf16-tc").
    pub fn from_label(s: &str) -> Option<Self> {
        Some(match s {
            "f32" => Self::f32(),
            "f16" => Self::f16().with_tensor_cores(false),
            "f16-tc" => Self::f16(),
            "bf16" => Self::bf16().with_tensor_cores(false),
            "bf16-tc" => Self::bf16(),
            _ => return None,
        })
    }
    /// Short name: "f32", "f16" / "bf16" (FP32 cores only) or "f16-tc" / "bf16-tc".
    pub fn label(&self) -> &'static str {
        match (self.precision, self.tensor_cores) {
            (Precision::F32, _) => "f32",
            (Precision::F16, false) => "f16",
            (Precision::F16, true) => "f16-tc",
            (Precision::Bf16, false) => "bf16",
            (Precision::Bf16, true) => "bf16-tc",
        }
    }
}

fn sync_from_env() -> bool {
    std::env::var("RLN_CUDA_SYNC").is_ok_and(|v| v == "1")
}

/// True when a CUDA driver is installed and reports at least one device (never panics).
pub fn available() -> bool {
    kernels::driver_present() && cudarc::driver::CudaContext::device_count().is_ok_and(|n| n > 0)
}

/// A model with random weights and batch-norm statistics of realistic scale, for tests
/// and benchmarks: conv weights N(0, 1)·1.5/√fan_in (activations stay O(1) through the
/// 17 layers in inference mode, so f16 storage is exercised on realistic values rather
/// than overflowing as the training init would without batch statistics), γ ∈ [0.5, 1.5],
/// β ∈ [−0.5, 0.5], running mean ∈ [−0.3, 0.3], running variance ∈ [0.5, 2].
pub fn random_model(seed: u64) -> Model<f32> {
    let config = ModelConfig {
        div_eps: 1e-4,
        provenance: format!("random test model, seed {seed}"),
        ..ModelConfig::default()
    };
    let mut m = Model::<f32>::init(config, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_cafe);
    for (l, spec) in LAYERS.iter().enumerate() {
        let p = &mut m.params.layers[l];
        if spec.op != LayerOp::BnOnly {
            let fan_in = spec.c_in_for(1) * if spec.op == LayerOp::Conv3 { 27 } else { 1 };
            let sd = 1.5 / (fan_in as f64).sqrt();
            for w in p.weight.iter_mut() {
                *w = (rng.sample::<f64, _>(StandardNormal) * sd) as f32;
            }
        }
        for c in 0..p.gamma.len() {
            p.gamma[c] = rng.random_range(0.5..1.5);
            p.beta[c] = rng.random_range(-0.5..0.5);
            m.running.mean[l][c] = rng.random_range(-0.3..0.3);
            m.running.var[l][c] = rng.random_range(0.5..2.0);
        }
    }
    m
}

/// [`random_model`] as a dual-view ("concat", two input channels) model: the convs that
/// read the input (h1.fp.conv1, h2.fp.conv1) weigh the two views 0.6 and 0.4 of the
/// single-view weights, so the activations keep the scale of [`random_model`].
pub fn random_dual_model(seed: u64) -> Model<f32> {
    let mut m = random_model(seed);
    m.config.variant = crate::model::Variant::DualConcat;
    m.config.provenance = format!("random dual-view test model, seed {seed}");
    for (l, spec) in LAYERS.iter().enumerate() {
        if spec.op != LayerOp::Conv3 || !spec.reads_input {
            continue;
        }
        let one = std::mem::take(&mut m.params.layers[l].weight);
        let mut w = vec![0f32; 2 * one.len()];
        for o in 0..spec.c_out {
            for (c, share) in [0.6f32, 0.4].into_iter().enumerate() {
                for t in 0..27 {
                    w[(o * 2 + c) * 27 + t] = share * one[o * 27 + t];
                }
            }
        }
        m.params.layers[l].weight = w;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::net::{BnMode, Rln};
    use crate::tensor::{Shape, Tensor};

    /// The dual-view random model is a valid dual-view model (every tensor the size the
    /// variant needs) and, on two equal views, the single-view model.
    #[test]
    fn the_dual_view_random_model_is_the_single_one_on_equal_views() {
        let (one, two) = (random_model(3), random_dual_model(3));
        for (l, spec) in LAYERS.iter().enumerate() {
            assert_eq!(two.params.layers[l].weight.len(), spec.weight_len(2), "{}", spec.name);
        }
        let s = Shape::new(1, 1, 4, 6, 8);
        let x = Tensor::from_vec(s, (0..s.len()).map(|i| (i % 7) as f32 / 7.0 + 0.1).collect()).unwrap();
        let mut xx = Tensor::zeros(s.with_c(2));
        xx.data[..s.len()].copy_from_slice(&x.data);
        xx.data[s.len()..].copy_from_slice(&x.data);
        let b = CpuBackend::<f32>::new();
        let y1 = Rln::new(&b, &one).infer(&x, false).unwrap().prediction;
        let y2 = Rln::new(&b, &two).infer(&xx, false).unwrap().prediction;
        let e = crate::tensor::rel_l2(&y2.data, &y1.data);
        assert!(e < 1e-5, "rel L2 {e:e}");
    }

    /// The random models of the GPU tests and the benchmark must keep every activation
    /// well inside the fp16 range (and away from all-zero), or the f16 tests prove little.
    #[test]
    fn random_models_keep_activations_in_fp16_range() {
        for seed in [1u64, 4, 7, 100, 104] {
            let m = random_model(seed);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let s = Shape::new(1, 1, 12, 16, 20);
            let x = Tensor::from_vec(s, (0..s.len()).map(|_| rng.random_range(0.0f32..1.0)).collect()).unwrap();
            let b = CpuBackend::<f32>::new();
            let f = Rln::new(&b, &m).forward(&x, BnMode::Running, true).unwrap();
            let a = &f.tape.as_ref().unwrap().acts;
            let named = [
                ("a1", &a.a1),
                ("a2", &a.a2),
                ("dv1", &a.dv1),
                ("b1", &a.b1),
                ("b2", &a.b2),
                ("b3", &a.b3),
                ("u", &a.u),
                ("e1", &a.e1),
                ("c1", &a.c1),
                ("dv2", &a.dv2),
                ("d1", &a.d1),
                ("e2", &a.e2),
                ("f1", &a.f1),
                ("f2", &a.f2),
                ("y", &a.y),
            ];
            for (n, t) in named {
                let max = t.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(
                    t.all_finite() && max < 1e3 && max > 1e-3,
                    "seed {seed}: {n} max |v| = {max}"
                );
            }
        }
    }
}
