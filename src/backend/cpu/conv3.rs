//! 3×3×3 convolution (zero padding 1, stride 1, no bias) over a virtual channel
//! concatenation of inputs: forward with a fused epilogue, data gradient, weight gradient.
//!
//! Work is split into (volume n, output plane d) tasks run by rayon. Inside a task, for
//! each output row h, the up-to-9·C_in input rows it needs are copied into a zero-padded
//! scratch (so the x edges need no special case), then each chunk of XB output voxels ×
//! G output channels is accumulated in registers over all taps and written once through
//! the epilogue. The data gradient is the same kernel with flipped, transposed weights.

use super::simd::madd;
use super::{AddendRef, CpuEpilogue, SyncPtr};
use crate::isa_variants;
use crate::real::Real;
use crate::tensor::{Shape, Tensor};
use rayon::prelude::*;

/// Scratch row length: every chunk start x0 < w can read 66 values (the widest chunk,
/// 64, plus the halo) without leaving its row.
fn padded_row_len(w: usize) -> usize {
    w.div_ceil(64) * 64 + 66
}

/// Input channels of all inputs in concatenation order: (input index, channel).
fn channel_list<T>(inputs: &[&Tensor<T>]) -> Vec<(usize, usize)> {
    inputs.iter().enumerate().flat_map(|(i, t)| (0..t.shape.c).map(move |c| (i, c))).collect()
}

/// Checks that all inputs share batch and spatial size; returns it with the total channels.
fn concat_shape<T>(inputs: &[&Tensor<T>]) -> Shape {
    let s0 = inputs[0].shape;
    for t in inputs {
        assert!(
            t.shape.n == s0.n && t.shape.dims() == s0.dims(),
            "conv3 inputs disagree: {} vs {}",
            t.shape,
            s0
        );
    }
    s0.with_c(inputs.iter().map(|t| t.shape.c).sum())
}

/// Copies the input rows that output row (n, d, h) reads into `scratch` (slot
/// cin·9 + kd·3 + kh, zero-padded: position p holds x = p − 1) and lists the valid taps
/// as (slot, cin·9 + kd·3 + kh).
#[inline(always)]
fn gather_rows<T: Real>(
    inputs: &[&Tensor<T>],
    chans: &[(usize, usize)],
    n: usize,
    d: usize,
    h: usize,
    s: Shape,
    wp: usize,
    scratch: &mut [T],
    taps: &mut Vec<u32>,
) {
    taps.clear();
    for (cin, &(i, c)) in chans.iter().enumerate() {
        let plane = inputs[i].plane(n, c);
        for kd in 0..3 {
            let zd = d as isize + kd as isize - 1;
            if zd < 0 || zd >= s.d as isize {
                continue;
            }
            for kh in 0..3 {
                let zh = h as isize + kh as isize - 1;
                if zh < 0 || zh >= s.h as isize {
                    continue;
                }
                let slot = cin * 9 + kd * 3 + kh;
                let row = &plane[(zd as usize * s.h + zh as usize) * s.w..][..s.w];
                scratch[slot * wp + 1..slot * wp + 1 + s.w].copy_from_slice(row);
                taps.push(slot as u32);
            }
        }
    }
}

/// Accumulates one chunk: G output channels × XB voxels starting at x0, over all taps.
/// `wpack` holds, per tap slot, 3 (kw) × G weights.
#[inline(always)]
fn conv_chunk<T: Real, const FMA: bool, const G: usize, const XB: usize>(
    scratch: &[T],
    wp: usize,
    taps: &[u32],
    wpack: &[T],
    x0: usize,
) -> [[T; XB]; G] {
    let mut acc = [[T::zero(); XB]; G];
    for &slot in taps {
        let slot = slot as usize;
        let src: &[T; 66] = scratch[slot * wp + x0..][..66].try_into().unwrap();
        let wk: &[T] = &wpack[slot * 3 * G..][..3 * G];
        for kw in 0..3 {
            for (co, a) in acc.iter_mut().enumerate() {
                let wv = wk[kw * G + co];
                for l in 0..XB {
                    a[l] = madd::<T, FMA>(wv, src[kw + l], a[l]);
                }
            }
        }
    }
    acc
}

/// Everything a forward task needs.
struct FwdCtx<'a, T> {
    inputs: &'a [&'a Tensor<T>],
    chans: Vec<(usize, usize)>,
    s: Shape,
    c_out: usize,
    /// Per output-channel group (offset, size): packed weights [slot][kw][G].
    groups: Vec<(usize, usize, Vec<T>)>,
    epi: &'a CpuEpilogue<'a, T>,
    out: SyncPtr<T>,
    out_shape: Shape,
}

/// Splits `c` output channels into kernel groups of 8, 4, 2, 1.
fn group_sizes(c: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let mut o = 0;
    for g in [8, 4, 2, 1] {
        while c - o >= g {
            v.push((o, g));
            o += g;
        }
    }
    v
}

/// Packs weights [c_out][c_in][27] into per-group [slot = cin·9 + kd·3 + kh][kw][G].
fn pack_weights<T: Real>(weight: &[T], c_in: usize, c_out: usize) -> Vec<(usize, usize, Vec<T>)> {
    group_sizes(c_out)
        .into_iter()
        .map(|(o0, g)| {
            let mut p = vec![T::zero(); c_in * 27 * g];
            for co in 0..g {
                for ci in 0..c_in {
                    for k in 0..27 {
                        p[((ci * 9 + k / 3) * 3 + k % 3) * g + co] = weight[((o0 + co) * c_in + ci) * 27 + k];
                    }
                }
            }
            (o0, g, p)
        })
        .collect()
}

#[inline(always)]
fn store_chunk<T: Real, const G: usize, const XB: usize>(
    ctx: &FwdCtx<'_, T>,
    acc: &[[T; XB]; G],
    o0: usize,
    n: usize,
    d: usize,
    h: usize,
    x0: usize,
    addend_row: &[T],
) {
    let s = ctx.s;
    let valid = XB.min(s.w - x0);
    for (co, a) in acc.iter().enumerate() {
        let c = o0 + co;
        let (sc, sh) = (ctx.epi.scale[c], ctx.epi.shift[c]);
        let mut v = [T::zero(); XB];
        for l in 0..XB {
            let mut t = a[l] * sc + sh;
            if ctx.epi.softplus {
                t = t.softplus();
            }
            v[l] = t + addend_row[x0 + l];
        }
        let off = ctx.out_shape.plane(n, c) + (d * s.h + h) * s.w + x0;
        // SAFETY: each (n, d) task writes only its own rows of its own plane; off+valid
        // stays inside the row (valid <= w - x0).
        unsafe { ctx.out.write_slice(off, &v[..valid]) };
    }
}

#[inline(always)]
fn fwd_task<T: Real, const FMA: bool, const WIDTH: usize>(ctx: &FwdCtx<'_, T>, nd: usize) {
    let s = ctx.s;
    let (n, d) = (nd / s.d, nd % s.d);
    let wp = padded_row_len(s.w);
    let mut scratch = vec![T::zero(); ctx.chans.len() * 9 * wp];
    let mut taps = Vec::with_capacity(ctx.chans.len() * 9);
    let mut addend_row = vec![T::zero(); wp];
    for h in 0..s.h {
        gather_rows(ctx.inputs, &ctx.chans, n, d, h, s, wp, &mut scratch, &mut taps);
        match ctx.epi.addend {
            AddendRef::None => {}
            AddendRef::Const(c) => addend_row.iter_mut().for_each(|v| *v = c),
            AddendRef::SoftplusOf(t) => {
                let row = &t.plane(n, 0)[(d * s.h + h) * s.w..][..s.w];
                for (o, &v) in addend_row.iter_mut().zip(row) {
                    *o = v.softplus();
                }
            }
        }
        for (o0, g, wpack) in &ctx.groups {
            let mut x0 = 0;
            while x0 < s.w {
                // chunk widths: ~128 accumulators per chunk, fewer lanes when W is small
                macro_rules! run {
                    ($g:literal, $xb:literal) => {{
                        let acc = conv_chunk::<T, FMA, $g, $xb>(&scratch, wp, &taps, wpack, x0);
                        store_chunk::<T, $g, $xb>(ctx, &acc, *o0, n, d, h, x0, &addend_row);
                        x0 += $xb;
                    }};
                }
                match (*g, WIDTH) {
                    (8, 16) => run!(8, 16),
                    (8, _) => run!(8, 8),
                    (4, 16) => run!(4, 32),
                    (4, _) => run!(4, 16),
                    (2, 16) => run!(2, 32),
                    (2, _) => run!(2, 16),
                    (_, 16) => run!(1, 32),
                    _ => run!(1, 16),
                }
            }
        }
    }
}

isa_variants!(fn fwd_task_dispatch<T>(ctx: &FwdCtx<'_, T>, nd: usize) -> () => fwd_task, wide = 16, narrow = 8);

/// conv3 forward with a fused epilogue. `weight` is [c_out][Σ c_in][3][3][3].
pub fn conv3_forward<T: Real>(inputs: &[&Tensor<T>], weight: &[T], c_out: usize, epi: &CpuEpilogue<'_, T>) -> Tensor<T> {
    let s = concat_shape(inputs);
    assert_eq!(weight.len(), c_out * s.c * 27, "conv3 weight has {} values, expected {c_out}×{}×27", weight.len(), s.c);
    let out_shape = s.with_c(c_out);
    let mut out = Tensor::<T>::zeros(out_shape);
    let ctx = FwdCtx {
        inputs,
        chans: channel_list(inputs),
        s,
        c_out,
        groups: pack_weights(weight, s.c, c_out),
        epi,
        out: SyncPtr::new(&mut out.data),
        out_shape,
    };
    debug_assert!(ctx.c_out == epi.scale.len());
    (0..s.n * s.d).into_par_iter().for_each(|nd| fwd_task_dispatch(&ctx, nd));
    out
}

/// Gradient with respect to the inputs whose `needed` flag is set: each is the
/// correlation of dz with the flipped weights, transposed in (in, out).
pub fn conv3_backward_data<T: Real>(dz: &Tensor<T>, weight: &[T], c_in: &[usize], needed: &[bool]) -> Vec<Option<Tensor<T>>> {
    let c_out = dz.shape.c;
    let c_total: usize = c_in.iter().sum();
    assert_eq!(weight.len(), c_out * c_total * 27);
    let mut offset = 0;
    let mut out = Vec::new();
    for (&cs, &need) in c_in.iter().zip(needed) {
        if need {
            // w'[i][o][k] = w[o][offset + i][26 - k]
            let mut wt = vec![T::zero(); cs * c_out * 27];
            for i in 0..cs {
                for o in 0..c_out {
                    for k in 0..27 {
                        wt[(i * c_out + o) * 27 + k] = weight[(o * c_total + offset + i) * 27 + 26 - k];
                    }
                }
            }
            let epi = CpuEpilogue::identity(cs);
            out.push(Some(conv3_forward(&[dz], &wt, cs, &epi)));
        } else {
            out.push(None);
        }
        offset += cs;
    }
    out
}

/// Everything a weight-gradient task group needs.
struct WgradCtx<'a, T> {
    inputs: &'a [&'a Tensor<T>],
    chans: Vec<(usize, usize)>,
    dz: &'a Tensor<T>,
    s: Shape,
}

/// Weight gradient of the (n, d) tasks in `range`, summed in a fixed order (so results
/// do not depend on the thread count): [c_out][c_in][27] in f64.
#[inline(always)]
fn wgrad_group<T: Real, const FMA: bool, const WIDTH: usize>(ctx: &WgradCtx<'_, T>, range: std::ops::Range<usize>) -> Vec<f64> {
    match WIDTH {
        16 => wgrad_group_g::<T, FMA, 4, 16>(ctx, range),
        _ => wgrad_group_g::<T, FMA, 2, 8>(ctx, range),
    }
}

#[inline(always)]
fn wgrad_group_g<T: Real, const FMA: bool, const G: usize, const XB: usize>(
    ctx: &WgradCtx<'_, T>,
    range: std::ops::Range<usize>,
) -> Vec<f64> {
    let s = ctx.s;
    let c_in = ctx.chans.len();
    let c_out = ctx.dz.shape.c;
    let wp = padded_row_len(s.w);
    let mut scratch = vec![T::zero(); c_in * 9 * wp];
    let mut dzs = vec![T::zero(); c_out * wp];
    let mut taps = Vec::with_capacity(c_in * 9);
    // lane accumulators [slot][kw][c_out][XB], reduced to f64 at the end of the group
    let mut accv = vec![T::zero(); c_in * 9 * 3 * c_out * XB];
    let chunks = s.w.div_ceil(XB);
    for nd in range {
        let (n, d) = (nd / s.d, nd % s.d);
        for h in 0..s.h {
            gather_rows(ctx.inputs, &ctx.chans, n, d, h, s, wp, &mut scratch, &mut taps);
            for co in 0..c_out {
                let row = &ctx.dz.plane(n, co)[(d * s.h + h) * s.w..][..s.w];
                dzs[co * wp..co * wp + s.w].copy_from_slice(row);
            }
            for &slot in &taps {
                let slot = slot as usize;
                let src = &scratch[slot * wp..][..wp];
                let mut o0 = 0;
                while o0 + G <= c_out {
                    let mut acc = [[[T::zero(); XB]; G]; 3];
                    for (kw, a) in acc.iter_mut().enumerate() {
                        for (g, ag) in a.iter_mut().enumerate() {
                            ag.copy_from_slice(&accv[((slot * 3 + kw) * c_out + o0 + g) * XB..][..XB]);
                        }
                    }
                    for ch in 0..chunks {
                        let x0 = ch * XB;
                        let xs: &[T; 66] = src[x0..][..66].try_into().unwrap();
                        for g in 0..G {
                            let dzr: &[T; XB] = dzs[(o0 + g) * wp + x0..][..XB].try_into().unwrap();
                            for kw in 0..3 {
                                for l in 0..XB {
                                    acc[kw][g][l] = madd::<T, FMA>(dzr[l], xs[kw + l], acc[kw][g][l]);
                                }
                            }
                        }
                    }
                    for (kw, a) in acc.iter().enumerate() {
                        for (g, ag) in a.iter().enumerate() {
                            accv[((slot * 3 + kw) * c_out + o0 + g) * XB..][..XB].copy_from_slice(ag);
                        }
                    }
                    o0 += G;
                }
                // leftover output channels (c_out not a multiple of G): one at a time
                for co in o0..c_out {
                    for kw in 0..3 {
                        let a = &mut accv[((slot * 3 + kw) * c_out + co) * XB..][..XB];
                        for ch in 0..chunks {
                            let x0 = ch * XB;
                            for l in 0..XB {
                                a[l] = madd::<T, FMA>(dzs[co * wp + x0 + l], src[x0 + kw + l], a[l]);
                            }
                        }
                    }
                }
            }
        }
    }
    let mut dw = vec![0.0f64; c_out * c_in * 27];
    for slot in 0..c_in * 9 {
        let (cin, kdkh) = (slot / 9, slot % 9);
        for kw in 0..3 {
            for co in 0..c_out {
                let lanes = &accv[((slot * 3 + kw) * c_out + co) * XB..][..XB];
                dw[(co * c_in + cin) * 27 + kdkh * 3 + kw] = lanes.iter().map(|v| v.f64()).sum();
            }
        }
    }
    dw
}

isa_variants!(fn wgrad_dispatch<T>(ctx: &WgradCtx<'_, T>, range: std::ops::Range<usize>) -> Vec<f64> => wgrad_group, wide = 16, narrow = 8);

/// Number of fixed work groups of the reductions: the summation order depends on it,
/// never on the thread count.
pub(crate) const REDUCTION_GROUPS: usize = 64;

/// ∂L/∂w of conv3: Σ over voxels of dz[co] · input[cin] shifted by the tap, in f64.
/// Result layout [c_out][Σ c_in][3][3][3].
pub fn conv3_backward_weight<T: Real>(inputs: &[&Tensor<T>], dz: &Tensor<T>) -> Vec<f64> {
    let s = concat_shape(inputs);
    assert!(dz.shape.n == s.n && dz.shape.dims() == s.dims(), "conv3 weight gradient: dz {} vs input {}", dz.shape, s);
    let ctx = WgradCtx { inputs, chans: channel_list(inputs), dz, s };
    let tasks = s.n * s.d;
    let groups = REDUCTION_GROUPS.min(tasks);
    let partials: Vec<Vec<f64>> = (0..groups)
        .into_par_iter()
        .map(|g| wgrad_dispatch(&ctx, (g * tasks / groups)..((g + 1) * tasks / groups)))
        .collect();
    let mut dw = vec![0.0; dz.shape.c * s.c * 27];
    for p in partials {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    dw
}
