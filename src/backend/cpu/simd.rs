//! Run-time choice of the instruction set the CPU kernels are compiled for.
//!
//! The kernels are plain generic Rust over fixed-size arrays; LLVM vectorizes them.
//! Each is instantiated three times, inside functions compiled with AVX-512, AVX2+FMA,
//! or the baseline x86-64 features, and the widest the CPU supports is called. This keeps
//! the release binary portable (it also runs on the GPU machines) while using the vector
//! units of the machine it runs on.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Baseline,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2+fma",
            Isa::Baseline => "baseline",
        }
    }
}

/// The instruction set in use; `RLN_ISA=avx2|baseline` forces a narrower one (for tests
/// and benchmarks of the fallbacks).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let detected = detect();
        match std::env::var("RLN_ISA").as_deref() {
            Ok("baseline") => Isa::Baseline,
            Ok("avx2") if detected != Isa::Baseline => Isa::Avx2,
            _ => detected,
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("fma")
    {
        Isa::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Isa::Avx2
    } else {
        Isa::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Baseline
}

/// a·b + c, fused when the kernel is compiled with FMA (then it is one instruction;
/// without FMA, `mul_add` would call a slow software routine).
#[inline(always)]
pub fn madd<T: crate::real::Real, const FMA: bool>(a: T, b: T, c: T) -> T {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Expands to a `match isa()` that calls `$body` (a generic function taking const
/// parameters `FMA` and a width) compiled for each instruction set.
/// Usage: `dispatch!(name, [T], (args...) -> Ret, body::<T, FMA, W>)`.
#[macro_export]
macro_rules! isa_variants {
    ($vis:vis fn $name:ident<$T:ident>($($arg:ident : $ty:ty),*) -> $ret:ty => $body:ident, wide = $w512:expr, narrow = $w256:expr) => {
        $vis fn $name<$T: $crate::real::Real>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
                unsafe fn v512<$T: $crate::real::Real>($($arg: $ty),*) -> $ret {
                    $body::<$T, true, { $w512 }>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v256<$T: $crate::real::Real>($($arg: $ty),*) -> $ret {
                    $body::<$T, true, { $w256 }>($($arg),*)
                }
                match $crate::backend::cpu::simd::isa() {
                    // SAFETY: the CPU supports the features these were compiled for (checked by isa()).
                    $crate::backend::cpu::simd::Isa::Avx512 => return unsafe { v512::<$T>($($arg),*) },
                    $crate::backend::cpu::simd::Isa::Avx2 => return unsafe { v256::<$T>($($arg),*) },
                    $crate::backend::cpu::simd::Isa::Baseline => {}
                }
            }
            $body::<$T, false, { $w256 }>($($arg),*)
        }
    };
}
