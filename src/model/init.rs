//! Initialization for training from scratch, as the authors did (rln-spec.md §4).

use super::layers::{LayerOp, FP_CONVS, LAYERS};
use super::{Model, ModelConfig, Params, RunningStats};
use crate::real::Real;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Widths of the Gaussian blobs of the FP convs' output channels 0..3.
const FP_BLOB_SIGMAS: [f64; 4] = [4.0, 1.0, 2.0, 3.0];

impl<T: Real> Model<T> {
    /// A freshly initialized model: FP convs as Gaussian blobs (each (out, in) pair
    /// scaled by a uniform factor in [0.7, 1]), every other conv truncated normal
    /// (mean 0, std 1, redrawn beyond 2 std), BN γ=1, β=0, running mean 0, variance 1.
    pub fn init(config: ModelConfig, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = Params::<T>::zeros(config.variant);
        let ic = config.variant.input_channels();
        for (l, spec) in LAYERS.iter().enumerate() {
            let p = &mut params.layers[l];
            if FP_CONVS.iter().any(|f| *f as usize == l) {
                let ci = spec.c_in_for(ic);
                for o in 0..spec.c_out {
                    let s = FP_BLOB_SIGMAS[o % 4];
                    for i in 0..ci {
                        let factor: f64 = rng.random_range(0.7..=1.0);
                        for k in 0..27 {
                            let (a, b, c) = ((k / 9) as f64 - 1.0, ((k / 3) % 3) as f64 - 1.0, (k % 3) as f64 - 1.0);
                            let r2 = a * a + b * b + c * c;
                            p.weight[(o * ci + i) * 27 + k] = T::of(factor * (-r2 / (2.0 * s * s)).exp());
                        }
                    }
                }
            } else if spec.op != LayerOp::BnOnly {
                for w in p.weight.iter_mut() {
                    *w = T::of(truncated_normal(&mut rng));
                }
            }
            p.gamma.iter_mut().for_each(|g| *g = T::one());
        }
        Model {
            config,
            params,
            running: RunningStats::initial(),
        }
    }
}

/// Standard normal redrawn until |v| <= 2 (TF's truncated_normal).
fn truncated_normal(rng: &mut ChaCha8Rng) -> f64 {
    loop {
        let v: f64 = rng.sample(StandardNormal);
        if v.abs() <= 2.0 {
            return v;
        }
    }
}
