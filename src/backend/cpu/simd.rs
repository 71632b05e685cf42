//! Run-time choice of the instruction set the CPU kernels are compiled for.
//!
//! The kernels are plain generic Rust over fixed-size arrays; LLVM vectorizes them.
//! Each is instantiated three times, inside functions compiled with AVX-512, AVX2+FMA,
//! or the baseline x86-64 features, and the widest the CPU supports is called. This keeps
//! the release binary portable (it also runs on the GPU machines) while using the vector
//! units of the machine it runs on.

use std::sync::atomic::{AtomicU8, Ordering};
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

static FORCED: AtomicU8 = AtomicU8::new(0);

/// Forces a narrower instruction set for the whole process (tests of the fallbacks);
/// None returns to the detected one. Requests the CPU cannot run are ignored.
#[doc(hidden)]
pub fn force_isa(isa: Option<Isa>) {
    let v = match isa {
        None => 0,
        Some(Isa::Avx512) => 1,
        Some(Isa::Avx2) => 2,
        Some(Isa::Baseline) => 3,
    };
    FORCED.store(v, Ordering::SeqCst);
}

/// The widest instruction set this CPU supports, as [`isa`] may use.
pub fn detected() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

/// The instruction set in use; `RLN_ISA=avx2|baseline` forces a narrower one (for tests
/// and benchmarks of the fallbacks).
pub fn isa() -> Isa {
    let supported = |i: Isa| match (i, detected()) {
        (Isa::Baseline, _) => true,
        (Isa::Avx2, d) => d != Isa::Baseline,
        (Isa::Avx512, d) => d == Isa::Avx512,
    };
    match FORCED.load(Ordering::Relaxed) {
        1 if supported(Isa::Avx512) => return Isa::Avx512,
        2 if supported(Isa::Avx2) => return Isa::Avx2,
        3 => return Isa::Baseline,
        _ => {}
    }
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let detected = detected();
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

/// A SIMD vector of `LANES` scalars of type `T`, for the hand-vectorized kernels.
/// Implementations exist for AVX-512 (16×f32, 8×f64), AVX2 (8×f32, 4×f64) and a scalar
/// fallback. All methods are unsafe: the caller must run on a CPU with the features the
/// type needs, and pointers must be valid for `LANES` elements.
pub trait Vector: Copy {
    type T: crate::real::Real;
    const LANES: usize;
    /// Every lane 0.
    ///
    /// # Safety
    /// The CPU has the features the type needs.
    unsafe fn zero() -> Self;
    /// Every lane `v`.
    ///
    /// # Safety
    /// The CPU has the features the type needs.
    unsafe fn splat(v: Self::T) -> Self;
    /// `LANES` scalars from `p` (unaligned).
    ///
    /// # Safety
    /// The CPU has the features the type needs; `p` is valid for reading `LANES` scalars.
    unsafe fn load(p: *const Self::T) -> Self;
    /// The lanes to `p` (unaligned).
    ///
    /// # Safety
    /// The CPU has the features the type needs; `p` is valid for writing `LANES` scalars.
    unsafe fn store(self, p: *mut Self::T);
    /// self·b + c
    ///
    /// # Safety
    /// The CPU has the features the type needs.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// self + b
    ///
    /// # Safety
    /// The CPU has the features the type needs.
    unsafe fn add(self, b: Self) -> Self;
}

/// One scalar as a vector of one lane (the baseline fallback).
#[derive(Clone, Copy)]
pub struct Scalar<T>(T);

impl<T: crate::real::Real> Vector for Scalar<T> {
    type T = T;
    const LANES: usize = 1;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Scalar(T::zero())
    }
    #[inline(always)]
    unsafe fn splat(v: T) -> Self {
        Scalar(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const T) -> Self {
        Scalar(*p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut T) {
        *p = self.0
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        Scalar(self.0 * b.0 + c.0)
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        Scalar(self.0 + b.0)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Vector;
    use std::arch::x86_64::*;

    macro_rules! vector {
        ($name:ident, $t:ty, $raw:ty, $lanes:expr, $zero:ident, $set1:ident, $load:ident, $store:ident, $fmadd:ident, $add:ident) => {
            #[derive(Clone, Copy)]
            pub struct $name($raw);
            impl Vector for $name {
                type T = $t;
                const LANES: usize = $lanes;
                #[inline(always)]
                unsafe fn zero() -> Self {
                    $name($zero())
                }
                #[inline(always)]
                unsafe fn splat(v: $t) -> Self {
                    $name($set1(v))
                }
                #[inline(always)]
                unsafe fn load(p: *const $t) -> Self {
                    $name($load(p))
                }
                #[inline(always)]
                unsafe fn store(self, p: *mut $t) {
                    $store(p, self.0)
                }
                #[inline(always)]
                unsafe fn mul_add(self, b: Self, c: Self) -> Self {
                    $name($fmadd(self.0, b.0, c.0))
                }
                #[inline(always)]
                unsafe fn add(self, b: Self) -> Self {
                    $name($add(self.0, b.0))
                }
            }
        };
    }
    vector!(
        F32x16,
        f32,
        __m512,
        16,
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps
    );
    vector!(
        F64x8,
        f64,
        __m512d,
        8,
        _mm512_setzero_pd,
        _mm512_set1_pd,
        _mm512_loadu_pd,
        _mm512_storeu_pd,
        _mm512_fmadd_pd,
        _mm512_add_pd
    );
    vector!(
        F32x8,
        f32,
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps
    );
    vector!(
        F64x4,
        f64,
        __m256d,
        4,
        _mm256_setzero_pd,
        _mm256_set1_pd,
        _mm256_loadu_pd,
        _mm256_storeu_pd,
        _mm256_fmadd_pd,
        _mm256_add_pd
    );
}

#[cfg(target_arch = "x86_64")]
pub use x86::{F32x16, F32x8, F64x4, F64x8};

/// A scalar type the CPU kernels run on: a [`Real`](crate::real::Real) with its SIMD
/// vectors for the AVX-512 and AVX2 kernels (kept here, not on `Real`, so the scalar
/// layer does not depend on the CPU backend).
pub trait CpuReal: crate::real::Real {
    #[cfg(target_arch = "x86_64")]
    type Wide: Vector<T = Self>;
    #[cfg(target_arch = "x86_64")]
    type Narrow: Vector<T = Self>;
}

impl CpuReal for f64 {
    #[cfg(target_arch = "x86_64")]
    type Wide = F64x8;
    #[cfg(target_arch = "x86_64")]
    type Narrow = F64x4;
}

impl CpuReal for f32 {
    #[cfg(target_arch = "x86_64")]
    type Wide = F32x16;
    #[cfg(target_arch = "x86_64")]
    type Narrow = F32x8;
}

/// Like [`isa_variants!`], but the body takes a vector type `V` (with `V::T = T`)
/// instead of a width: AVX-512 gets `T::Wide`, AVX2 `T::Narrow`, baseline `Scalar<T>`.
#[macro_export]
macro_rules! simd_variants {
    ($vis:vis fn $name:ident<$T:ident>($($arg:ident : $ty:ty),*) -> $ret:ty => $body:ident) => {
        $vis fn $name<$T: $crate::backend::cpu::simd::CpuReal>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
                unsafe fn v512<$T: $crate::backend::cpu::simd::CpuReal>($($arg: $ty),*) -> $ret {
                    $body::<$T, <$T as $crate::backend::cpu::simd::CpuReal>::Wide>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v256<$T: $crate::backend::cpu::simd::CpuReal>($($arg: $ty),*) -> $ret {
                    $body::<$T, <$T as $crate::backend::cpu::simd::CpuReal>::Narrow>($($arg),*)
                }
                match $crate::backend::cpu::simd::isa() {
                    // SAFETY: the CPU supports the features these were compiled for (checked by isa()).
                    $crate::backend::cpu::simd::Isa::Avx512 => return unsafe { v512::<$T>($($arg),*) },
                    $crate::backend::cpu::simd::Isa::Avx2 => return unsafe { v256::<$T>($($arg),*) },
                    $crate::backend::cpu::simd::Isa::Baseline => {}
                }
            }
            // SAFETY: the scalar "vector" needs no CPU feature.
            #[allow(unused_unsafe)]
            unsafe { $body::<$T, $crate::backend::cpu::simd::Scalar<$T>>($($arg),*) }
        }
    };
}
