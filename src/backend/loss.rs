//! The training loss of rln-spec.md §5 and its gradient: the CPU oracle
//! ([`loss_and_grad`]) and the terms every backend's [`super::Backend::loss`] returns (a
//! device reduces [`LossSums`] and finishes with [`loss_from_sums`]). It lives with the
//! backends, below the training loop that reports it.
//!
//! L = MSE(y, g) + 1e-4 + 0.1·(MSE(E1r, 0.8g + 0.2x) + 1e-4) − ln((1 + S)/2), with S one
//! global SSIM over every voxel of the batch (means, biased variances, covariance).

use crate::real::Real;
use serde::Serialize;

const C1: f64 = 1e-4;
const C2: f64 = 9e-4;
const MSE_OFFSET: f64 = 1e-4;
const AUX_WEIGHT: f64 = 0.1;

/// The loss terms as the authors' graph reports them (mse terms include their +1e-4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LossTerms {
    pub mse: f64,
    pub mse_aux: f64,
    pub ssim: f64,
    pub loss: f64,
}

/// Global SSIM of two equally long slices, with its ingredients.
struct GlobalSsim {
    s: f64,
    mu_y: f64,
    mu_g: f64,
    a: f64,
    b: f64,
    c: f64,
    d: f64,
}

fn global_ssim<T: Real>(y: &[T], g: &[T]) -> GlobalSsim {
    let n = y.len() as f64;
    let mu_y = y.iter().map(|v| v.f64()).sum::<f64>() / n;
    let mu_g = g.iter().map(|v| v.f64()).sum::<f64>() / n;
    let (mut vy, mut vg, mut cov) = (0.0, 0.0, 0.0);
    for (a, b) in y.iter().zip(g) {
        let (dy, dg) = (a.f64() - mu_y, b.f64() - mu_g);
        vy += dy * dy;
        vg += dg * dg;
        cov += dy * dg;
    }
    let (vy, vg, cov) = (vy / n, vg / n, cov / n);
    let a = 2.0 * mu_y * mu_g + C1;
    let b = 2.0 * cov + C2;
    let c = mu_y * mu_y + mu_g * mu_g + C1;
    let d = vy + vg + C2;
    GlobalSsim {
        s: a * b / (c * d),
        mu_y,
        mu_g,
        a,
        b,
        c,
        d,
    }
}

/// The loss terms only (no gradient).
pub fn loss_terms<T: Real>(y: &[T], e1r: &[T], x: &[T], g: &[T]) -> LossTerms {
    let n = y.len() as f64;
    let mse = y.iter().zip(g).map(|(a, b)| (a.f64() - b.f64()).powi(2)).sum::<f64>() / n + MSE_OFFSET;
    let mse_aux = e1r
        .iter()
        .zip(g)
        .zip(x)
        .map(|((e, gv), xv)| (e.f64() - (0.8 * gv.f64() + 0.2 * xv.f64())).powi(2))
        .sum::<f64>()
        / n
        + MSE_OFFSET;
    let ssim = global_ssim(y, g).s;
    LossTerms {
        mse,
        mse_aux,
        ssim,
        loss: mse + AUX_WEIGHT * mse_aux - ((1.0 + ssim) / 2.0).ln(),
    }
}

/// The loss terms and the gradients ∂L/∂y and ∂L/∂E1r. `x` is the (one-channel)
/// normalized input, `g` the normalized ground truth; all slices are N·D·H·W long.
pub fn loss_and_grad<T: Real>(y: &[T], e1r: &[T], x: &[T], g: &[T]) -> (LossTerms, Vec<T>, Vec<T>) {
    assert!(
        y.len() == g.len() && e1r.len() == g.len() && x.len() == g.len(),
        "loss: prediction, E1r, input and ground truth differ in size"
    );
    let terms = loss_terms(y, e1r, x, g);
    let n = y.len() as f64;
    let gs = global_ssim(y, g);
    // ∂(−ln((1+S)/2))/∂y_i = −S'/(1+S), S' = S·(A'/A + B'/B − C'/C − D'/D)
    let k = -gs.s / (1.0 + gs.s);
    let dy: Vec<T> = y
        .iter()
        .zip(g)
        .map(|(yv, gv)| {
            let (yv, gv) = (yv.f64(), gv.f64());
            let ds = (2.0 * gs.mu_g / n) / gs.a + (2.0 * (gv - gs.mu_g) / n) / gs.b
                - (2.0 * gs.mu_y / n) / gs.c
                - (2.0 * (yv - gs.mu_y) / n) / gs.d;
            T::of(2.0 * (yv - gv) / n + k * ds)
        })
        .collect();
    let de1r: Vec<T> = e1r
        .iter()
        .zip(g)
        .zip(x)
        .map(|((e, gv), xv)| T::of(AUX_WEIGHT * 2.0 * (e.f64() - (0.8 * gv.f64() + 0.2 * xv.f64())) / n))
        .collect();
    (terms, dy, de1r)
}

/// The sums the loss is made of, over n voxels: what a device reduces before the host
/// finishes the loss ([`loss_from_sums`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSums {
    pub n: f64,
    pub sum_y: f64,
    pub sum_g: f64,
    /// Σ (y − μy)²
    pub sq_y: f64,
    /// Σ (g − μg)²
    pub sq_g: f64,
    /// Σ (y − μy)(g − μg)
    pub cross: f64,
    /// Σ (y − g)²
    pub sq_err: f64,
    /// Σ (E1r − (0.8g + 0.2x))²
    pub sq_aux: f64,
}

/// The constants of the loss gradient: ∂L/∂y_i = 2(y_i − g_i)/n + k·((2μg/n)/A +
/// (2(g_i − μg)/n)/B − (2μy/n)/C − (2(y_i − μy)/n)/D) and ∂L/∂E1r_i = 0.2·(E1r_i − t_i)/n
/// (as [`loss_and_grad`] computes them).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossGradConsts {
    pub n: f64,
    pub mu_y: f64,
    pub mu_g: f64,
    pub a: f64,
    pub b: f64,
    pub c: f64,
    pub d: f64,
    pub k: f64,
}

/// The loss terms and the gradient's constants from the sums (the same formulas as
/// [`loss_terms`] and [`loss_and_grad`]).
pub fn loss_from_sums(s: &LossSums) -> (LossTerms, LossGradConsts) {
    let n = s.n;
    let (mu_y, mu_g) = (s.sum_y / n, s.sum_g / n);
    let (vy, vg, cov) = (s.sq_y / n, s.sq_g / n, s.cross / n);
    let a = 2.0 * mu_y * mu_g + C1;
    let b = 2.0 * cov + C2;
    let c = mu_y * mu_y + mu_g * mu_g + C1;
    let d = vy + vg + C2;
    let ssim = a * b / (c * d);
    let mse = s.sq_err / n + MSE_OFFSET;
    let mse_aux = s.sq_aux / n + MSE_OFFSET;
    let terms = LossTerms {
        mse,
        mse_aux,
        ssim,
        loss: mse + AUX_WEIGHT * mse_aux - ((1.0 + ssim) / 2.0).ln(),
    };
    let k = -ssim / (1.0 + ssim);
    (
        terms,
        LossGradConsts {
            n,
            mu_y,
            mu_g,
            a,
            b,
            c,
            d,
            k,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four vectors of `n` uniform values in [0, 1) (prediction, E, input, ground truth).
    fn random_vectors(n: usize, seed: u64) -> [Vec<f64>; 4] {
        let mut s = seed;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        std::array::from_fn(|_| (0..n).map(|_| rnd()).collect())
    }

    #[test]
    fn loss_from_sums_matches_the_direct_loss_and_gradient() {
        let n = 64;
        let [y, e, x, g] = random_vectors(n, 99);
        let nf = n as f64;
        let (my, mg) = (y.iter().sum::<f64>() / nf, g.iter().sum::<f64>() / nf);
        let sums = LossSums {
            n: nf,
            sum_y: y.iter().sum(),
            sum_g: g.iter().sum(),
            sq_y: y.iter().map(|v| (v - my) * (v - my)).sum(),
            sq_g: g.iter().map(|v| (v - mg) * (v - mg)).sum(),
            cross: y.iter().zip(&g).map(|(a, b)| (a - my) * (b - mg)).sum(),
            sq_err: y.iter().zip(&g).map(|(a, b)| (a - b) * (a - b)).sum(),
            sq_aux: (0..n).map(|i| (e[i] - (0.8 * g[i] + 0.2 * x[i])).powi(2)).sum(),
        };
        let (t, k) = loss_from_sums(&sums);
        let (want, dy, _) = loss_and_grad(&y, &e, &x, &g);
        for (a, b) in [
            (t.loss, want.loss),
            (t.mse, want.mse),
            (t.mse_aux, want.mse_aux),
            (t.ssim, want.ssim),
        ] {
            assert!((a - b).abs() <= 1e-13 * b.abs().max(1.0), "{a} vs {b}");
        }
        for i in [0, 17, 63] {
            let ds = (2.0 * k.mu_g / k.n) / k.a + (2.0 * (g[i] - k.mu_g) / k.n) / k.b
                - (2.0 * k.mu_y / k.n) / k.c
                - (2.0 * (y[i] - k.mu_y) / k.n) / k.d;
            let got = 2.0 * (y[i] - g[i]) / k.n + k.k * ds;
            assert!((got - dy[i]).abs() <= 1e-15, "{got} vs {}", dy[i]);
        }
    }

    #[test]
    fn loss_gradient_matches_central_differences() {
        let n = 50;
        let [y, e, x, g] = random_vectors(n, 12345);
        let (_, dy, de) = loss_and_grad(&y, &e, &x, &g);
        let h = 1e-6;
        for i in [0, 7, 31, 49] {
            let f = |yy: &[f64], ee: &[f64]| loss_terms(yy, ee, &x, &g).loss;
            let (mut yp, mut ym) = (y.clone(), y.clone());
            yp[i] += h;
            ym[i] -= h;
            let fd = (f(&yp, &e) - f(&ym, &e)) / (2.0 * h);
            assert!(
                (fd - dy[i]).abs() <= 1e-6 * fd.abs().max(1e-3),
                "dy[{i}] {} vs fd {fd}",
                dy[i]
            );
            let (mut ep, mut em) = (e.clone(), e.clone());
            ep[i] += h;
            em[i] -= h;
            let fd = (f(&y, &ep) - f(&y, &em)) / (2.0 * h);
            assert!(
                (fd - de[i]).abs() <= 1e-6 * fd.abs().max(1e-3),
                "de1r[{i}] {} vs fd {fd}",
                de[i]
            );
        }
    }
}
