//! 3×3×3 convolution (zero padding 1, stride 1, no bias) over a virtual channel
//! concatenation of inputs: forward with a fused epilogue, data gradient, weight gradient.
//!
//! Work is split into (volume n, output plane d) tasks run by rayon. Inside a task, for
//! each output row h, the up-to-9·C_in input rows it needs are copied into a zero-padded
//! scratch (so the x edges need no special case), then each chunk of XB output voxels ×
//! G output channels is accumulated in registers over all taps and written once through
//! the epilogue. The data gradient is the same kernel with flipped, transposed weights.

use super::simd::{CpuReal, Vector};
use super::{AddendRef, CpuEpilogue, SyncPtr};
use crate::real::Real;
use crate::simd_variants;
use crate::tensor::{Shape, Tensor};
use rayon::prelude::*;

/// Scratch row length: every chunk start x0 < w can read 66 values (the widest chunk,
/// 64, plus the halo) without leaving its row.
fn padded_row_len(w: usize) -> usize {
    w.div_ceil(64) * 64 + 66
}

/// Input channels of all inputs in concatenation order: (input index, channel).
fn channel_list<T>(inputs: &[&Tensor<T>]) -> Vec<(usize, usize)> {
    inputs
        .iter()
        .enumerate()
        .flat_map(|(i, t)| (0..t.shape.c).map(move |c| (i, c)))
        .collect()
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

/// Makes the input rows that output row (n, d, h) reads available in `scratch` and lists
/// the valid taps as (scratch row, weight slot cin·9 + kd·3 + kh).
///
/// Rows are zero-padded (position p holds x = p − 1) and kept in a ring of three per
/// (cin, kd): row zh lives in scratch row (cin·3 + kd)·3 + zh mod 3. Called for h = 0,
/// 1, 2, ... in order, each call copies only the one new row zh = h + 1 (two at h = 0).
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
    taps: &mut Vec<(u32, u32)>,
) {
    taps.clear();
    let new_rows = if h == 0 { 0..2 } else { h + 1..h + 2 };
    for (cin, &(i, c)) in chans.iter().enumerate() {
        let plane = inputs[i].plane(n, c);
        for kd in 0..3 {
            let zd = d as isize + kd as isize - 1;
            if zd < 0 || zd >= s.d as isize {
                continue;
            }
            let zd = zd as usize;
            for zh in new_rows.clone() {
                if zh < s.h {
                    let r = (cin * 3 + kd) * 3 + zh % 3;
                    scratch[r * wp + 1..r * wp + 1 + s.w].copy_from_slice(&plane[(zd * s.h + zh) * s.w..][..s.w]);
                }
            }
            for kh in 0..3 {
                let zh = h as isize + kh as isize - 1;
                if zh < 0 || zh >= s.h as isize {
                    continue;
                }
                let r = (cin * 3 + kd) * 3 + zh as usize % 3;
                taps.push((r as u32, (cin * 9 + kd * 3 + kh) as u32));
            }
        }
    }
}

/// Accumulates one chunk: G output channels × NV vectors of voxels starting at x0, over
/// all taps. `wpack` holds, per tap slot, 3 (kw) × G weights.
///
/// # Safety
/// The CPU must support `V`; every tap row must hold x0 + NV·LANES + 2 values (the
/// scratch rows are padded for chunks up to 64 wide).
#[inline(always)]
unsafe fn conv_chunk<T: Real, V: Vector<T = T>, const G: usize, const NV: usize>(
    scratch: &[T],
    wp: usize,
    taps: &[(u32, u32)],
    wpack: &[T],
    x0: usize,
) -> [[V; NV]; G] {
    debug_assert!(NV * V::LANES <= 64);
    let mut acc = [[V::zero(); NV]; G];
    let sp = scratch.as_ptr();
    for &(row, slot) in taps {
        let (row, slot) = (row as usize, slot as usize);
        debug_assert!(row * wp + x0 + NV * V::LANES + 2 <= scratch.len());
        let row = sp.add(row * wp + x0);
        let wk: &[T] = &wpack[slot * 3 * G..][..3 * G];
        for kw in 0..3 {
            let mut src = [V::zero(); NV];
            for (j, v) in src.iter_mut().enumerate() {
                *v = V::load(row.add(kw + j * V::LANES));
            }
            for (co, a) in acc.iter_mut().enumerate() {
                let w = V::splat(wk[kw * G + co]);
                for j in 0..NV {
                    a[j] = w.mul_add(src[j], a[j]);
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

/// Applies the epilogue to a finished chunk and writes its valid voxels.
#[inline(always)]
unsafe fn store_chunk<T: Real, V: Vector<T = T>, const G: usize, const NV: usize>(
    ctx: &FwdCtx<'_, T>,
    acc: &[[V; NV]; G],
    o0: usize,
    n: usize,
    d: usize,
    h: usize,
    x0: usize,
    addend_row: &[T],
) {
    let s = ctx.s;
    let xb = NV * V::LANES;
    let valid = xb.min(s.w - x0);
    let mut v = [T::zero(); 64];
    for (co, a) in acc.iter().enumerate() {
        let c = o0 + co;
        for (j, vj) in a.iter().enumerate() {
            vj.store(v.as_mut_ptr().add(j * V::LANES));
        }
        let (sc, sh) = (ctx.epi.scale[c], ctx.epi.shift[c]);
        let add = &addend_row[x0..x0 + xb];
        if ctx.epi.softplus {
            for l in 0..xb {
                v[l] = (v[l] * sc + sh).softplus() + add[l];
            }
        } else {
            for l in 0..xb {
                v[l] = v[l] * sc + sh + add[l];
            }
        }
        let off = ctx.out_shape.plane(n, c) + (d * s.h + h) * s.w + x0;
        // each (n, d) task writes only its own rows of its own plane; off+valid stays
        // inside the row (valid <= w - x0).
        ctx.out.write_slice(off, &v[..valid]);
    }
}

#[inline(always)]
unsafe fn fwd_task<T: Real, V: Vector<T = T>>(ctx: &FwdCtx<'_, T>, nd: usize) {
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
                // NV vectors per channel: enough independent accumulators to hide the
                // FMA latency, few enough to stay in registers (32 with AVX-512, 16 with AVX2)
                macro_rules! run {
                    ($g:literal, $nv:literal) => {{
                        let acc = conv_chunk::<T, V, $g, $nv>(&scratch, wp, &taps, wpack, x0);
                        store_chunk::<T, V, $g, $nv>(ctx, &acc, *o0, n, d, h, x0, &addend_row);
                        x0 += $nv * V::LANES;
                    }};
                }
                match (*g, V::LANES) {
                    (8, 16) => run!(8, 2),
                    (8, 8) => run!(8, 1),
                    (8, _) => run!(8, 4),
                    (4, 16) | (4, 8) => run!(4, 2),
                    (4, _) => run!(4, 4),
                    (2, 1) => run!(2, 4),
                    (2, _) => run!(2, 4),
                    (_, 16) => run!(1, 4),
                    _ => run!(1, 8),
                }
            }
        }
    }
}

simd_variants!(fn fwd_task_dispatch<T>(ctx: &FwdCtx<'_, T>, nd: usize) -> () => fwd_task);

/// conv3 forward with a fused epilogue. `weight` is [c_out][Σ c_in][3][3][3].
pub fn conv3_forward<T: CpuReal>(
    inputs: &[&Tensor<T>],
    weight: &[T],
    c_out: usize,
    epi: &CpuEpilogue<'_, T>,
) -> Tensor<T> {
    let s = concat_shape(inputs);
    assert_eq!(
        weight.len(),
        c_out * s.c * 27,
        "conv3 weight has {} values, expected {c_out}×{}×27",
        weight.len(),
        s.c
    );
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
    (0..s.n * s.d)
        .into_par_iter()
        .for_each(|nd| fwd_task_dispatch(&ctx, nd));
    out
}

/// Gradient with respect to the inputs whose `needed` flag is set: each is the
/// correlation of dz with the flipped weights, transposed in (in, out).
pub fn conv3_backward_data<T: CpuReal>(
    dz: &Tensor<T>,
    weight: &[T],
    c_in: &[usize],
    needed: &[bool],
) -> Vec<Option<Tensor<T>>> {
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

/// Accumulates, for one tap row and output channels o0..o0+G, the lane partial sums
/// Σ_x dz[co][x]·src[x + kw] into `accv` ([slot][kw][c_out][LANES]).
///
/// # Safety
/// The CPU must support `V`; `src` and the dz scratch rows must hold chunks·LANES + 2
/// and chunks·LANES values.
#[inline(always)]
unsafe fn wgrad_tap<T: Real, V: Vector<T = T>, const G: usize>(
    src: *const T,
    dzs: *const T,
    wp: usize,
    accv: &mut [T],
    slot: usize,
    c_out: usize,
    o0: usize,
    chunks: usize,
) {
    let l = V::LANES;
    let base = |kw: usize, g: usize| ((slot * 3 + kw) * c_out + o0 + g) * l;
    let mut acc = [[V::zero(); G]; 3];
    for (kw, a) in acc.iter_mut().enumerate() {
        for (g, v) in a.iter_mut().enumerate() {
            *v = V::load(accv[base(kw, g)..][..l].as_ptr());
        }
    }
    for ch in 0..chunks {
        let x0 = ch * l;
        let s = [V::load(src.add(x0)), V::load(src.add(x0 + 1)), V::load(src.add(x0 + 2))];
        for g in 0..G {
            let dz = V::load(dzs.add((o0 + g) * wp + x0));
            for kw in 0..3 {
                acc[kw][g] = dz.mul_add(s[kw], acc[kw][g]);
            }
        }
    }
    for (kw, a) in acc.iter().enumerate() {
        for (g, v) in a.iter().enumerate() {
            v.store(accv[base(kw, g)..][..l].as_mut_ptr());
        }
    }
}

/// Weight gradient of the (n, d) tasks in `range`, summed in a fixed order (so results
/// do not depend on the thread count): [c_out][c_in][27] in f64.
#[inline(always)]
unsafe fn wgrad_group<T: Real, V: Vector<T = T>>(ctx: &WgradCtx<'_, T>, range: std::ops::Range<usize>) -> Vec<f64> {
    let s = ctx.s;
    let c_in = ctx.chans.len();
    let c_out = ctx.dz.shape.c;
    let l = V::LANES;
    let wp = padded_row_len(s.w);
    let mut scratch = vec![T::zero(); c_in * 9 * wp];
    let mut dzs = vec![T::zero(); c_out * wp];
    let mut taps = Vec::with_capacity(c_in * 9);
    let mut accv = vec![T::zero(); c_in * 9 * 3 * c_out * l];
    let chunks = s.w.div_ceil(l);
    // output channels per pass: 3·G accumulators + 4 loads must fit the register file
    let g_main = match l {
        16 => 8,
        8 => 4,
        _ => 2,
    };
    for nd in range {
        let (n, d) = (nd / s.d, nd % s.d);
        for h in 0..s.h {
            gather_rows(ctx.inputs, &ctx.chans, n, d, h, s, wp, &mut scratch, &mut taps);
            for co in 0..c_out {
                let row = &ctx.dz.plane(n, co)[(d * s.h + h) * s.w..][..s.w];
                dzs[co * wp..co * wp + s.w].copy_from_slice(row);
            }
            for &(row, slot) in &taps {
                let slot = slot as usize;
                let src = scratch.as_ptr().add(row as usize * wp);
                let mut o0 = 0;
                while o0 < c_out {
                    let left = c_out - o0;
                    let step = if left >= g_main {
                        g_main
                    } else if left >= 4 {
                        4
                    } else if left >= 2 {
                        2
                    } else {
                        1
                    };
                    match step {
                        8 => wgrad_tap::<T, V, 8>(src, dzs.as_ptr(), wp, &mut accv, slot, c_out, o0, chunks),
                        4 => wgrad_tap::<T, V, 4>(src, dzs.as_ptr(), wp, &mut accv, slot, c_out, o0, chunks),
                        2 => wgrad_tap::<T, V, 2>(src, dzs.as_ptr(), wp, &mut accv, slot, c_out, o0, chunks),
                        _ => wgrad_tap::<T, V, 1>(src, dzs.as_ptr(), wp, &mut accv, slot, c_out, o0, chunks),
                    }
                    o0 += step;
                }
            }
        }
    }
    let mut dw = vec![0.0f64; c_out * c_in * 27];
    for slot in 0..c_in * 9 {
        let (cin, kdkh) = (slot / 9, slot % 9);
        for kw in 0..3 {
            for co in 0..c_out {
                let lanes = &accv[((slot * 3 + kw) * c_out + co) * l..][..l];
                dw[(co * c_in + cin) * 27 + kdkh * 3 + kw] = lanes.iter().map(|v| v.f64()).sum();
            }
        }
    }
    dw
}

simd_variants!(fn wgrad_dispatch<T>(ctx: &WgradCtx<'_, T>, range: std::ops::Range<usize>) -> Vec<f64> => wgrad_group);

/// Number of fixed work groups of the reductions: the summation order depends on it,
/// never on the thread count.
pub(crate) const REDUCTION_GROUPS: usize = 64;

/// ∂L/∂w of conv3: Σ over voxels of dz[co] · input[cin] shifted by the tap, in f64.
/// Result layout [c_out][Σ c_in][3][3][3].
pub fn conv3_backward_weight<T: CpuReal>(inputs: &[&Tensor<T>], dz: &Tensor<T>) -> Vec<f64> {
    let s = concat_shape(inputs);
    assert!(
        dz.shape.n == s.n && dz.shape.dims() == s.dims(),
        "conv3 weight gradient: dz {} vs input {}",
        dz.shape,
        s
    );
    let ctx = WgradCtx {
        inputs,
        chans: channel_list(inputs),
        dz,
        s,
    };
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
