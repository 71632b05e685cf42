//! The scalar types the CPU backend is generic over: f32 (speed) and f64 (gradient checks).
//!
//! The network spends most of its non-conv time in softplus and its derivative, so the
//! f32 versions are branch-free polynomial approximations (≈1 ulp-level, relative error
//! < 2e-7) that LLVM vectorizes inside loops; the f64 versions use libm and are exact to
//! rounding, which the finite-difference checks need.
//!
//! This module is below every other: the SIMD vectors the CPU kernels use for each type
//! are attached in the CPU backend ([`crate::backend::cpu::CpuReal`]), not here.

use num_traits::{Float, FromPrimitive, NumAssign, ToPrimitive};
use std::fmt::{Debug, Display};
use std::iter::Sum;

pub trait Real:
    Float + NumAssign + FromPrimitive + ToPrimitive + Sum + Default + Debug + Display + Send + Sync + 'static
{
    /// Name used in messages and benchmark output.
    const NAME: &'static str;
    fn of(v: f64) -> Self;
    fn f64(self) -> f64;
    /// ln(1 + e^t), accurate for every t.
    fn softplus(self) -> Self;
    /// 1 / (1 + e^-t): the derivative of softplus.
    fn sigmoid(self) -> Self;
}

impl Real for f64 {
    const NAME: &'static str = "f64";
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn softplus(self) -> Self {
        self.max(0.0) + (-self.abs()).exp().ln_1p()
    }
    #[inline(always)]
    fn sigmoid(self) -> Self {
        if self >= 0.0 {
            1.0 / (1.0 + (-self).exp())
        } else {
            let e = self.exp();
            e / (1.0 + e)
        }
    }
}

impl Real for f32 {
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn softplus(self) -> Self {
        // max(t, 0) + ln(1 + e^-|t|), with e^-|t| in (0, 1]
        self.max(0.0) + ln_1p_unit(exp_neg(self.abs()))
    }
    #[inline(always)]
    fn sigmoid(self) -> Self {
        // e = e^-|t| in (0, 1]; sigmoid(t) = 1/(1+e) for t >= 0, e/(1+e) otherwise
        let e = exp_neg(self.abs());
        let r = 1.0 / (1.0 + e);
        if self >= 0.0 {
            r
        } else {
            e * r
        }
    }
}

/// e^-a for a >= 0 (a may be +inf), branch-free: e^-a = 2^k · e^r with |r| <= ln2/2.
/// Written with integer bit tricks instead of `round` and `as i32` (which become libm
/// calls or long sequences), so that loops over it vectorize.
#[inline(always)]
pub fn exp_neg(a: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2^23: adding it rounds to the nearest integer, which lands in the low mantissa bits
    const ROUNDER: f32 = 12_582_912.0;
    // beyond 87 the result underflows; the clamp keeps 2^k a normal number. Written as a
    // compare (not f32::min) so that NaN propagates instead of becoming e^-87.
    let x = -(if a > 87.0 { 87.0 } else { a });
    let t = x * LOG2E + ROUNDER;
    let k = t - ROUNDER;
    let ki = (t.to_bits() as i32).wrapping_sub(0x4B40_0000); // k as an integer, in [-126, 0]
    let r = x - k * LN2_HI - k * LN2_LO;
    // Taylor to degree 7 on |r| <= 0.347: relative error < 1e-7
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits((ki.wrapping_add(127) as u32) << 23)
}

/// ln(1 + e) for e in [0, 1], branch-free: ln(m) = 2·atanh(s), s = (m-1)/(m+1) = e/(2+e) <= 1/3.
#[inline(always)]
pub fn ln_1p_unit(e: f32) -> f32 {
    let s = e / (2.0 + e);
    let s2 = s * s;
    // 2(s + s^3/3 + ... + s^15/15): truncation error < 2·(1/3)^17/17 ≈ 1e-9
    let p = 1.0
        + s2 * (1.0 / 3.0
            + s2 * (1.0 / 5.0
                + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0 + s2 * (1.0 / 13.0 + s2 * (1.0 / 15.0)))))));
    2.0 * s * p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_softplus_and_sigmoid_match_f64_libm() {
        let mut worst_sp = 0.0f64;
        let mut worst_sig = 0.0f64;
        // relative error where the value is a normal f32, absolute below that
        let err = |a: f64, r: f64| (a - r).abs() / r.abs().max(1e-30);
        let mut t = -100.0f64;
        while t <= 100.0 {
            let x = t as f32;
            worst_sp = worst_sp.max(err(x.softplus() as f64, (x as f64).softplus()));
            worst_sig = worst_sig.max(err(x.sigmoid() as f64, (x as f64).sigmoid()));
            t += 0.001_37;
        }
        assert!(worst_sp < 5e-7, "softplus relative error {worst_sp:e}");
        assert!(worst_sig < 5e-7, "sigmoid relative error {worst_sig:e}");
        assert_eq!(f32::INFINITY.softplus(), f32::INFINITY);
        assert!(f32::NAN.softplus().is_nan() && f32::NAN.sigmoid().is_nan());
    }
}
