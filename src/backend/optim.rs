//! The optimizer's arithmetic, the reference every backend's resident state
//! ([`super::Backend::opt_step`]) matches: Adam as TF1 implements it, with the authors'
//! learning-rate schedule (spec §5), and the batch-norm running-statistics update (§4).
//! (`train::adam` re-exports it for the trainer's users; it lives here, below the
//! network, because the backends implement it.)

use super::ChannelStats;
use crate::model::{Model, Params, Variant};
use crate::real::Real;
use serde::{Deserialize, Serialize};

/// lr(t) = base · decay^(t / decay_steps), continuous exponential decay.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub base: f64,
    pub decay_rate: f64,
    pub decay_steps: f64,
}

impl Default for LrSchedule {
    /// The authors': 0.015 · 0.95^(t/600).
    fn default() -> Self {
        LrSchedule {
            base: 0.015,
            decay_rate: 0.95,
            decay_steps: 600.0,
        }
    }
}

impl LrSchedule {
    pub fn lr(&self, step: u64) -> f64 {
        self.base * self.decay_rate.powf(step as f64 / self.decay_steps)
    }
}

pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPSILON: f64 = 1e-8;

/// The effective step size of step t under `schedule`: lr(t)·√(1−β2^(t+1))/(1−β1^(t+1))
/// (every backend's Adam takes it from here, so they agree bit for bit).
pub fn lr_t(schedule: &LrSchedule, t: u64) -> f64 {
    let p = (t + 1) as f64;
    schedule.lr(t) * (1.0 - BETA2.powf(p)).sqrt() / (1.0 - BETA1.powf(p))
}

/// Adam's moments and step counter.
#[derive(Clone, Debug, PartialEq)]
pub struct Adam {
    pub m: Params<f64>,
    pub v: Params<f64>,
    /// Steps taken so far (t of the next step).
    pub step: u64,
    pub schedule: LrSchedule,
}

impl Adam {
    pub fn new(variant: Variant, schedule: LrSchedule) -> Self {
        Adam {
            m: Params::zeros(variant),
            v: Params::zeros(variant),
            step: 0,
            schedule,
        }
    }

    /// The effective step size of step t: lr(t)·√(1−β2^(t+1))/(1−β1^(t+1)).
    pub fn lr_t(&self, t: u64) -> f64 {
        lr_t(&self.schedule, t)
    }

    /// One update of `params` with gradient `grad`:
    /// m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², w ← w − lr_t·m/(√v + ε).
    pub fn update<T: Real>(&mut self, params: &mut Params<T>, grad: &Params<f64>) {
        let lr_t = self.lr_t(self.step);
        for (l, layer) in params.layers.iter_mut().enumerate() {
            let g = &grad.layers[l];
            let (m, v) = (&mut self.m.layers[l], &mut self.v.layers[l]);
            for (w, g, m, v) in [
                (&mut layer.weight, &g.weight, &mut m.weight, &mut v.weight),
                (&mut layer.gamma, &g.gamma, &mut m.gamma, &mut v.gamma),
                (&mut layer.beta, &g.beta, &mut m.beta, &mut v.beta),
            ] {
                assert_eq!(w.len(), g.len(), "gradient of layer {l} has the wrong size");
                for i in 0..w.len() {
                    m[i] = BETA1 * m[i] + (1.0 - BETA1) * g[i];
                    v[i] = BETA2 * v[i] + (1.0 - BETA2) * g[i] * g[i];
                    w[i] = T::of(w[i].f64() - lr_t * m[i] / (v[i].sqrt() + EPSILON));
                }
            }
        }
        self.step += 1;
    }
}

/// The once-per-step running-statistics update: r ← m·r + (1 − m)·batch, with the
/// biased batch variance (spec §4).
pub fn update_running_stats<T: Real>(model: &mut Model<T>, stats: &[Option<ChannelStats>]) {
    let m = model.config.bn_momentum;
    for (l, s) in stats.iter().enumerate() {
        if let Some(s) = s {
            for c in 0..s.mean.len() {
                let rm = &mut model.running.mean[l][c];
                *rm = T::of(m * rm.f64() + (1.0 - m) * s.mean[c]);
                let rv = &mut model.running.var[l][c];
                *rv = T::of(m * rv.f64() + (1.0 - m) * s.var[c]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_and_first_steps_follow_tf1() {
        let s = LrSchedule::default();
        assert!((s.lr(0) - 0.015).abs() < 1e-15);
        assert!((s.lr(600) - 0.015 * 0.95).abs() < 1e-15);
        assert!((s.lr(300) - 0.015 * 0.95f64.sqrt()).abs() < 1e-15);
        // first step: m = 0.1g, v = 0.001g², lr_t = lr·√0.001/0.1 → update = lr·sign(g) (up to ε)
        let mut p = Params::<f64>::zeros(Variant::Single);
        let mut g = Params::<f64>::zeros(Variant::Single);
        g.layers[0].weight[0] = 0.5;
        g.layers[0].weight[1] = -2.0;
        let mut adam = Adam::new(Variant::Single, s);
        adam.update(&mut p, &g);
        // ε = 1e-8 next to √v ≈ 0.016 shifts the step by ~1e-8
        assert!(
            (p.layers[0].weight[0] + 0.015).abs() < 2e-8,
            "{}",
            p.layers[0].weight[0]
        );
        assert!((p.layers[0].weight[1] - 0.015).abs() < 2e-8);
        assert_eq!(p.layers[0].weight[2], 0.0);
        // second step with the same gradient, computed by hand
        let w1 = p.layers[0].weight[0];
        adam.update(&mut p, &g);
        let (m, v) = (0.9 * 0.05 + 0.1 * 0.5, 0.999 * 0.00025 + 0.001 * 0.25);
        let lr_t = s.lr(1) * (1.0 - 0.999f64.powi(2)).sqrt() / (1.0 - 0.9f64.powi(2));
        let want = w1 - lr_t * m / (f64::sqrt(v) + 1e-8);
        assert!((p.layers[0].weight[0] - want).abs() < 1e-12);
        assert_eq!(adam.step, 2);
    }
}
