//! Line-by-line CPU emulation of the mixed-precision training convs of
//! kernels/conv_mma_train.cuh (test-only): `tmma_fwd` (forward and data gradient) and
//! `tmma_wgrad` (per-block partials), every block, warp and lane, with the staging's
//! rounding to bf16 and the PTX ISA's mma.m16n8k16 fragments (emulate.rs `mma_16816`:
//! exact products, one f32 rounding per mma). The emulated device (emulate_train.rs
//! `EmuExec`) runs them, so the trainer's `--precision mixed` path runs in the unit
//! tests. (What this cannot catch: a difference between these lines and the .cuh lines,
//! and the hardware's own accumulation order inside an mma; keep them side by side.)

use super::emulate::mma_16816;
use super::emulate_tile::ConvIn;
use super::train_launch::{mma_chunks, mma_grid};
use super::Precision;

// namespace tmma
const TX: usize = 16;
const TY: usize = 8;
const TZ: usize = 8;
const SX: usize = TX + 2;
const SY: usize = TY + 2;
const SZ: usize = TZ + 2;
const NVOX: usize = SX * SY * SZ;
const WARPS: usize = 8;

/// tmma_stage_in: the tile with its halo, [NVOX][C_in] 16-bit patterns (zeros outside).
fn stage_in(a: &ConvIn, p: Precision, n: usize, z0: usize, y0: usize, x0: usize) -> Vec<u16> {
    let s = a.s;
    let cin = a.cin();
    let mut sin = vec![0u16; NVOX * cin];
    for (i, e) in sin.iter_mut().enumerate() {
        let (v, c) = (i / cin, i % cin);
        let (sx, sy, sz) = (v % SX, (v / SX) % SY, v / (SX * SY));
        let (gz, gy, gx) = ((z0 + sz) as isize - 1, (y0 + sy) as isize - 1, (x0 + sx) as isize - 1);
        let mut val = 0.0f32;
        if gz >= 0 && (gz as usize) < s.d && gy >= 0 && (gy as usize) < s.h && gx >= 0 && (gx as usize) < s.w {
            val = a.load_concat(((n * s.d + gz as usize) * s.h + gy as usize) * s.w + gx as usize, c);
        }
        *e = p.bits16(val);
    }
    sin
}

/// tmma_voxel
fn tap_voxel(lz: usize, ly: usize, lx: usize, tap: usize) -> usize {
    ((lz + tap / 9) * SY + ly + (tap / 3) % 3) * SX + lx + tap % 3
}

fn pair(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// tmma_fwd over the grid the host launches (train_launch::mma_grid) with packed weights
/// [ci][27][co] (f32, rounded when staged): calls `out(vox, co, z)` for every output
/// element inside the volume, in the kernel's order.
pub fn tmma_fwd(a: &ConvIn, packed: &[f32], cout: usize, p: Precision, mut out: impl FnMut(usize, usize, f32)) {
    let s = a.s;
    let cin = a.cin();
    assert!(cin % 2 == 0 && cout <= 8, "mma training conv: even C_in, C_out ≤ 8");
    assert_eq!(packed.len(), cin * 27 * cout, "weights [ci][27][co]");
    let nch = mma_chunks(cin);
    let kr = 27 * cin;
    let (gx, gy, gz) = mma_grid(s);
    let tiles_z = s.d.div_ceil(TZ);
    // B fragments, [chunk][lane] (b0, b1)
    let mut sb = vec![[0u32; 2]; nch * 32];
    for (i, b) in sb.iter_mut().enumerate() {
        let (ch, lane) = (i / 32, i % 32);
        let (g, t) = (lane >> 2, lane & 3);
        let mut w = [0u16; 4];
        for (j, wj) in w.iter_mut().enumerate() {
            let k = ch * 16 + 2 * t + (j & 1) + 8 * (j >> 1);
            let v = if k < kr && g < cout {
                packed[((k % cin) * 27 + k / cin) * cout + g]
            } else {
                0.0
            };
            *wj = p.bits16(v);
        }
        *b = [pair(w[0], w[1]), pair(w[2], w[3])];
    }
    for bz in 0..gz as usize {
        for by in 0..gy as usize {
            for bx in 0..gx as usize {
                let n = bz / tiles_z;
                let (z0, y0, x0) = ((bz - n * tiles_z) * TZ, by * TY, bx * TX);
                let sin = stage_in(a, p, n, z0, y0, x0);
                for lz in 0..TZ {
                    for ly in 0..TY {
                        let mut c = [[0.0f32; 4]; 32];
                        for ch in 0..nch {
                            let mut af = [[0u32; 4]; 32];
                            let mut bf = [[0u32; 2]; 32];
                            for lane in 0..32 {
                                let (g, t) = (lane >> 2, lane & 3);
                                for i in 0..4 {
                                    let (m, k) = (g + 8 * (i & 1), ch * 16 + 2 * t + 8 * (i >> 1));
                                    if k < kr {
                                        let e = tap_voxel(lz, ly, m, k / cin) * cin + k % cin;
                                        assert_eq!(e % 2, 0, "32-bit smem load");
                                        af[lane][i] = pair(sin[e], sin[e + 1]);
                                    }
                                }
                                bf[lane] = sb[ch * 32 + lane];
                            }
                            mma_16816(p, &af, &bf, &mut c);
                        }
                        let (gzz, gyy) = (z0 + lz, y0 + ly);
                        if gzz >= s.d || gyy >= s.h {
                            continue;
                        }
                        for (lane, cl) in c.iter().enumerate() {
                            let (g, t) = (lane >> 2, lane & 3);
                            for (i, &z) in cl.iter().enumerate() {
                                let (gxx, co) = (x0 + g + 8 * (i >> 1), 2 * t + (i & 1));
                                if co < cout && gxx < s.w {
                                    out(((n * s.d + gzz) * s.h + gyy) * s.w + gxx, co, z);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What one tmma_wgrad launch with `blocks` blocks writes: part[block][NW], NW in the
/// engine layout [co][ci][27].
pub fn tmma_wgrad_partials(a: &ConvIn, dz: &[f32], cout: usize, blocks: usize, p: Precision) -> Vec<f64> {
    let s = a.s;
    let cin = a.cin();
    assert!(cin % 2 == 0 && cout <= 8, "mma training conv: even C_in, C_out ≤ 8");
    let nch = mma_chunks(cin);
    let kr = 27 * cin;
    let nw = cout * cin * 27;
    let (tiles_x, tiles_y, tiles_z) = (s.w.div_ceil(TX), s.h.div_ceil(TY), s.d.div_ceil(TZ));
    let ntiles = tiles_x * tiles_y * tiles_z * s.n;
    let mut part = vec![f64::NAN; blocks * nw];
    for bx in 0..blocks {
        // acc64 of every warp's chunks: [chunk][lane][4]
        let mut acc64 = vec![[[0.0f64; 4]; 32]; nch];
        let mut tile = bx;
        while tile < ntiles {
            let (bxx, byy, bzn) = (tile % tiles_x, (tile / tiles_x) % tiles_y, tile / (tiles_x * tiles_y));
            let n = bzn / tiles_z;
            let (z0, y0, x0) = ((bzn - n * tiles_z) * TZ, byy * TY, bxx * TX);
            let sin = stage_in(a, p, n, z0, y0, x0);
            let mut sdz = vec![0u16; TX * TY * TZ * 8];
            for (i, e) in sdz.iter_mut().enumerate() {
                let (pp, co) = (i >> 3, i & 7);
                let (lx, ly, lz) = (pp % TX, (pp / TX) % TY, pp / (TX * TY));
                let (gz, gy, gx) = (z0 + lz, y0 + ly, x0 + lx);
                let v = if co < cout && gz < s.d && gy < s.h && gx < s.w {
                    dz[(((n * s.d + gz) * s.h + gy) * s.w + gx) * cout + co]
                } else {
                    0.0
                };
                *e = p.bits16(v);
            }
            for warp in 0..WARPS {
                let mut mc = warp;
                while mc < nch {
                    let mut c = [[0.0f32; 4]; 32];
                    for lz in 0..TZ {
                        for ly in 0..TY {
                            let mut af = [[0u32; 4]; 32];
                            let mut bf = [[0u32; 2]; 32];
                            for lane in 0..32 {
                                let (g, t) = (lane >> 2, lane & 3);
                                for i in 0..4 {
                                    let (m, x) = (mc * 16 + g + 8 * (i & 1), 2 * t + 8 * (i >> 1));
                                    if m < kr {
                                        let (v, cc) = (tap_voxel(lz, ly, x, m / cin), m % cin);
                                        af[lane][i] = pair(sin[v * cin + cc], sin[(v + 1) * cin + cc]);
                                    }
                                }
                                for i in 0..2 {
                                    let pp = (lz * TY + ly) * TX + 2 * t + 8 * i;
                                    bf[lane][i] = pair(sdz[pp * 8 + g], sdz[(pp + 1) * 8 + g]);
                                }
                            }
                            mma_16816(p, &af, &bf, &mut c);
                        }
                    }
                    for (lane, cl) in c.iter().enumerate() {
                        for i in 0..4 {
                            acc64[mc][lane][i] += cl[i] as f64;
                        }
                    }
                    mc += WARPS;
                }
            }
            tile += blocks;
        }
        for (mc, lanes) in acc64.iter().enumerate() {
            for (lane, v) in lanes.iter().enumerate() {
                let (g, t) = (lane >> 2, lane & 3);
                for (i, &val) in v.iter().enumerate() {
                    let (m, co) = (mc * 16 + g + 8 * (i >> 1), 2 * t + (i & 1));
                    if m < kr && co < cout {
                        part[bx * nw + (co * cin + m % cin) * 27 + m / cin] = val;
                    }
                }
            }
        }
    }
    part
}

#[cfg(test)]
mod tests {
    use super::super::emulate_train::EmuExec;
    use super::super::train_launch::{flip_transpose, MMA_VARIANTS};
    use crate::backend::cuda::CudaTrainBackend;
    use crate::backend::{Backend, Epilogue, TrainPrecision};
    use crate::tensor::{rel_l2, Shape, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::sync::Arc;

    /// f32's unit roundoff (2⁻²⁴) and bf16's (8 significant bits: 2⁻⁸).
    const U32: f64 = 1.0 / (1u64 << 24) as f64;
    const U16: f64 = 1.0 / 256.0;

    fn backend(p: TrainPrecision) -> (Arc<EmuExec>, CudaTrainBackend) {
        let exec = Arc::new(EmuExec::default());
        let mut b = CudaTrainBackend::on_exec(exec.clone(), true);
        b.set_precision(p);
        (exec, b)
    }

    fn random(shape: Shape, rng: &mut ChaCha8Rng) -> Tensor<f32> {
        Tensor::from_vec(
            shape,
            (0..shape.len()).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
        )
        .unwrap()
    }

    fn bf16(v: f32, round: bool) -> f64 {
        if round {
            half::bf16::from_f32(v).to_f32() as f64
        } else {
            v as f64
        }
    }

    /// conv3 of the concatenation `ins` (N×C×D×H×W) with engine weights [co][ci][27] in
    /// f64, operands rounded to bf16 when `round`: (values, Σ|products|), N×C_out×D×H×W.
    fn conv_f64(ins: &[&Tensor<f32>], w: &[f32], cout: usize, round: bool) -> (Vec<f64>, Vec<f64>) {
        let s = ins[0].shape;
        let cin: usize = ins.iter().map(|t| t.shape.c).sum();
        let (d, h, wd) = (s.d as isize, s.h as isize, s.w as isize);
        let os = s.with_c(cout);
        let (mut val, mut abs) = (vec![0.0f64; os.len()], vec![0.0f64; os.len()]);
        for n in 0..s.n {
            for co in 0..cout {
                for z in 0..d {
                    for y in 0..h {
                        for x in 0..wd {
                            let (mut acc, mut aa) = (0.0f64, 0.0f64);
                            let mut ci = 0;
                            for t in ins {
                                for c in 0..t.shape.c {
                                    for tap in 0..27isize {
                                        let (gz, gy, gx) = (z + tap / 9 - 1, y + (tap / 3) % 3 - 1, x + tap % 3 - 1);
                                        if gz < 0 || gz >= d || gy < 0 || gy >= h || gx < 0 || gx >= wd {
                                            continue;
                                        }
                                        let iv = t.data
                                            [((((n * t.shape.c + c) as isize * d + gz) * h + gy) * wd + gx) as usize];
                                        let wv = w[(co * cin + ci + c) * 27 + tap as usize];
                                        let p = bf16(iv, round) * bf16(wv, round);
                                        acc += p;
                                        aa += p.abs();
                                    }
                                }
                                ci += t.shape.c;
                            }
                            let o = ((((n * cout + co) as isize * d + z) * h + y) * wd + x) as usize;
                            val[o] = acc;
                            abs[o] = aa;
                        }
                    }
                }
            }
        }
        (val, abs)
    }

    /// dW[co][ci][27] = Σ_v in[v + tap][ci] · dz[v][co] in f64 (operands rounded to bf16
    /// when `round`): (values, Σ|products|).
    fn wgrad_f64(ins: &[&Tensor<f32>], dz: &Tensor<f32>, round: bool) -> (Vec<f64>, Vec<f64>) {
        let s = ins[0].shape;
        let cin: usize = ins.iter().map(|t| t.shape.c).sum();
        let cout = dz.shape.c;
        let (d, h, wd) = (s.d as isize, s.h as isize, s.w as isize);
        let (mut val, mut abs) = (vec![0.0f64; cout * cin * 27], vec![0.0f64; cout * cin * 27]);
        let mut ci0 = 0;
        for t in ins {
            for c in 0..t.shape.c {
                for co in 0..cout {
                    for tap in 0..27isize {
                        let (mut acc, mut aa) = (0.0f64, 0.0f64);
                        for n in 0..s.n {
                            for z in 0..d {
                                for y in 0..h {
                                    for x in 0..wd {
                                        let (gz, gy, gx) = (z + tap / 9 - 1, y + (tap / 3) % 3 - 1, x + tap % 3 - 1);
                                        if gz < 0 || gz >= d || gy < 0 || gy >= h || gx < 0 || gx >= wd {
                                            continue;
                                        }
                                        let iv = t.data
                                            [((((n * t.shape.c + c) as isize * d + gz) * h + gy) * wd + gx) as usize];
                                        let g =
                                            dz.data[((((n * cout + co) as isize * d + z) * h + y) * wd + x) as usize];
                                        let p = bf16(iv, round) * bf16(g, round);
                                        acc += p;
                                        aa += p.abs();
                                    }
                                }
                            }
                        }
                        let j = (co * cin + ci0 + c) * 27 + tap as usize;
                        val[j] = acc;
                        abs[j] = aa;
                    }
                }
            }
            ci0 += t.shape.c;
        }
        (val, abs)
    }

    /// The two checks of a mixed-precision result `got` against the f64 oracles:
    /// - against the conv of the **bf16-rounded** operands: within the f32 accumulation's
    ///   error, `chain` roundings of at most 2⁻²⁴·Σ|x̂ŵ| each (×2 slack): so a kernel whose
    ///   operands are not rounded, rounded differently (twice, or to fp16), or which
    ///   accumulates in 16 bits, fails (those errors are ~2⁻⁹·Σ|xw|, 10⁴× larger);
    /// - against the FP32 (unrounded) conv: within bf16's bound (2u + u²)·Σ|xw| per
    ///   element (u = 2⁻⁸, two rounded factors per product) plus the accumulation, and
    ///   with a relative L2 error of at least u/16 (≈ 0.8u expected): the operands really
    ///   were rounded (an FP32 kernel would give ~1e-7).
    ///
    /// Returns the relative L2 error against the FP32 oracle.
    fn check_mixed(what: &str, got: &[f64], r: &(Vec<f64>, Vec<f64>), f: &(Vec<f64>, Vec<f64>), chain: usize) -> f64 {
        assert_eq!(got.len(), r.0.len(), "{what}: length");
        for (i, &g) in got.iter().enumerate() {
            assert!(g.is_finite(), "{what}: element {i} not finite (not written?)");
            let tol_r = 2.0 * (chain + 1) as f64 * U32 * r.1[i] + 1e-30;
            assert!(
                (g - r.0[i]).abs() <= tol_r,
                "{what}: element {i} = {g:e}, bf16-operand oracle {:e}: |diff| {:e} > {tol_r:e}",
                r.0[i],
                (g - r.0[i]).abs()
            );
            let tol_f = (2.0 * U16 + U16 * U16) * f.1[i] + tol_r;
            assert!(
                (g - f.0[i]).abs() <= tol_f,
                "{what}: element {i} = {g:e}, FP32 oracle {:e} beyond bf16's bound {tol_f:e}",
                f.0[i]
            );
        }
        let e = rel_l2(got, &f.0);
        assert!(
            e >= U16 / 16.0,
            "{what}: rel L2 {e:e} vs FP32: the operands were not rounded to bf16"
        );
        e
    }

    /// (a) Every mixed-precision kernel (forward, data gradient, weight gradient) through
    /// the emulated device against f64 oracles (check_mixed), on volumes that are not
    /// tile multiples; the FP32 backend runs the same ops on its FFMA kernels.
    #[test]
    fn mixed_precision_convs_match_the_bf16_oracle_within_f32_accumulation() {
        let mut rng = ChaCha8Rng::seed_from_u64(16);
        let shapes = [Shape::new(2, 1, 9, 10, 19), Shape::new(1, 1, 5, 3, 33)];
        for (vi, v) in MMA_VARIANTS.iter().enumerate() {
            let s = shapes[vi % 2];
            let (exec, b) = backend(TrainPrecision::Mixed);
            let ins: Vec<Tensor<f32>> = v[..3]
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| random(s.with_c(c), &mut rng))
                .collect();
            let refs: Vec<&Tensor<f32>> = ins.iter().collect();
            let cin: usize = v[..3].iter().sum();
            let cout = v[3];
            let w: Vec<f32> = (0..cin * cout * 27).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let dx: Vec<_> = ins.iter().map(|t| b.from_host(t).unwrap()).collect();
            let dr: Vec<_> = dx.iter().collect();
            let nch = super::mma_chunks(cin);

            // forward
            let y = b
                .to_host(&b.conv3(&dr, &w, cout, &Epilogue::identity()).unwrap())
                .unwrap();
            let got: Vec<f64> = y.data.iter().map(|&v| v as f64).collect();
            let e = check_mixed(
                &format!("fwd {v:?}"),
                &got,
                &conv_f64(&refs, &w, cout, true),
                &conv_f64(&refs, &w, cout, false),
                nch,
            );
            eprintln!("fwd {v:?} at {s}: rel L2 vs FP32 {e:.2e}");

            // data gradient of every input slice (the wide ones on the tensor cores)
            let dz = random(s.with_c(cout), &mut rng);
            let ddz = b.from_host(&dz).unwrap();
            let cs: Vec<usize> = ins.iter().map(|t| t.shape.c).collect();
            let dg = b.conv3_backward_data(&ddz, &w, &cs, &vec![true; cs.len()]).unwrap();
            let mut off = 0;
            for (i, g) in dg.iter().enumerate() {
                let wt = flip_transpose(&w, cin, cout, off, cs[i]);
                off += cs[i];
                if cs[i] < 4 {
                    continue; // 8→1: FP32 cores (checked by the FP32 tests)
                }
                let got: Vec<f64> = b
                    .to_host(g.as_ref().unwrap())
                    .unwrap()
                    .data
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let e = check_mixed(
                    &format!("data gradient {v:?} slice {i}"),
                    &got,
                    &conv_f64(&[&dz], &wt, cs[i], true),
                    &conv_f64(&[&dz], &wt, cs[i], false),
                    super::mma_chunks(cout),
                );
                eprintln!("data gradient {v:?} slice {i}: rel L2 vs FP32 {e:.2e}");
            }

            // weight gradient: per tile an f32 chain of 64 mma
            let got = b.conv3_backward_weight(&dr, &ddz).unwrap();
            let e = check_mixed(
                &format!("wgrad {v:?}"),
                &got,
                &wgrad_f64(&refs, &dz, true),
                &wgrad_f64(&refs, &dz, false),
                64,
            );
            eprintln!("wgrad {v:?} at {s}: rel L2 vs FP32 {e:.2e}");

            let names = exec.launches.lock().unwrap().clone();
            for k in ["tmma_fwd", "tmma_wgrad"] {
                let want = format!("{k}_{}_{}_{}_{}_bf16", v[0], v[1], v[2], v[3]);
                assert!(names.contains(&want), "{want} not launched: {names:?}");
            }
        }
        // FP32 training launches no tensor-core kernel
        let (exec, b) = backend(TrainPrecision::Fp32);
        let s = Shape::new(1, 8, 4, 4, 4);
        let x = b.from_host(&random(s, &mut rng)).unwrap();
        let w = vec![0.01f32; 8 * 8 * 27];
        b.conv3(&[&x], &w, 8, &Epilogue::identity()).unwrap();
        b.conv3_backward_weight(&[&x], &x).unwrap();
        assert!(exec.launches.lock().unwrap().iter().all(|n| !n.starts_with("tmma_")));
    }
}
