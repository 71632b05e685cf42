//! Line-by-line CPU emulations of the two conv kernel families of inference (test-only):
//! the same tiles, halo fill, shared-memory indexing, fragment packing and epilogue index
//! math as kernels/conv_ffma.cuh (on the one tile emulation of kernels/conv3_tile.cuh,
//! emulate_tile.rs, shared with training) and kernels/conv3_mma.cuh (its three K layouts
//! P4, C8, C16, C_out 4 or 8, fp16 or bf16 operands), with the PTX ISA's definitions of
//! ldmatrix and mma.m16n8k16. Their output is compared with the CPU twins, which checks
//! the host-side weight layouts and every index formula without a GPU. (What this cannot
//! catch: a difference between these lines and the .cu lines; keep them side by side.)

use super::emulate_tile::{chunk, conv3_tile, ConvIn};
use super::launch::*;
use super::twin::StageOut;
use super::weights::{ffma_layout, pack_mma_b, FoldedConv};
use super::Precision;
use crate::real::Real;
use crate::tensor::{Shape, Tensor};

/// Inputs and epilogue parameters of one emulated launch (KernelArgs in host form).
pub struct EmuArgs<'a> {
    /// Channels-last inputs, f32 values (multi-channel ones already rounded to the
    /// storage type by the caller when emulating fp16 storage).
    pub inputs: Vec<(&'a [f32], usize)>,
    pub aux: Option<&'a [f32]>,
    pub n: usize,
    pub d: usize,
    pub h: usize,
    pub w: usize,
    pub post: (f32, f32),
    pub eps: f32,
    pub c_out: usize,
    pub epi: Epi,
}

impl EmuArgs<'_> {
    /// The inputs as the shared tile emulation takes them (its loader reads the concat).
    fn conv_in(&self) -> ConvIn<'_> {
        ConvIn {
            inputs: self.inputs.clone(),
            s: Shape::new(self.n, 1, self.d, self.h, self.w),
        }
    }
}

/// Output buffers of an emulated launch: channels-last `out` (C_out channels for Epi::Sp,
/// else one) and `raw`.
pub struct EmuOut {
    pub out: Vec<f32>,
    pub raw: Vec<f32>,
}

/// rln_epilogue_voxel (rl_nodes.cuh).
fn epilogue_voxel(a: &EmuArgs, o: &mut EmuOut, vox: usize, z: &[f32]) {
    let cout = z.len();
    let inv = 1.0f32 / cout as f32;
    match a.epi {
        Epi::Sp => {
            for c in 0..cout {
                o.out[vox * cout + c] = z[c].softplus();
            }
        }
        Epi::FpDiv => {
            let av = a.aux.unwrap()[vox];
            let spa = av.softplus();
            let s: f32 = z.iter().fold(0.0, |s, &v| s + (v.softplus() + spa));
            let q = av / (s * inv + a.eps);
            o.out[vox] = q * a.post.0 + a.post.1;
        }
        Epi::Update | Epi::UpdatePlus1 => {
            let one = if a.epi == Epi::UpdatePlus1 { 1.0 } else { 0.0 };
            let s: f32 = z.iter().fold(0.0, |s, &v| s + (v.softplus() + one));
            let e = (s * inv) * a.aux.unwrap()[vox];
            o.raw[vox] = e;
            o.out[vox] = (e * a.post.0 + a.post.1).softplus();
        }
        Epi::Mean => {
            let s: f32 = z.iter().fold(0.0, |s, &v| s + v.softplus());
            o.out[vox] = s * inv;
        }
    }
}

fn new_out(a: &EmuArgs) -> EmuOut {
    let vox = a.n * a.d * a.h * a.w;
    let oc = if a.epi == Epi::Sp { a.c_out } else { 1 };
    EmuOut {
        out: vec![f32::NAN; vox * oc],
        raw: vec![f32::NAN; vox],
    }
}

/// conv3_ffma (conv_ffma.cuh): the shared tile emulation (emulate_tile.rs) over the grid
/// launch.rs computes, with the folded weights in the FP32-core layout, then bias + the
/// fused epilogue per voxel (RlnConvEpi).
pub fn conv3_ffma(a: &EmuArgs, f: &FoldedConv) -> EmuOut {
    assert_eq!(ffma_chunk(f.c_in), chunk(f.c_in), "launch::ffma_chunk is conv3::chunk");
    let sw = ffma_layout(f);
    let bias = f.bias_f32();
    let mut o = new_out(a);
    let grid = tiled_grid(FFMA_TILE, a.n, a.d, a.h, a.w).unwrap();
    let ci = a.conv_in();
    assert_eq!(ci.cin(), f.c_in, "inputs carry C_in channels");
    conv3_tile(&ci, &sw, f.c_out, grid, |vox, z| {
        let zv: Vec<f32> = z.iter().zip(&bias).map(|(&z, &b)| z + b).collect();
        epilogue_voxel(a, &mut o, vox, &zv);
    });
    o
}

/// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 give the row addresses of
/// matrix i; lane l receives, of each matrix i, the 32-bit word at row l/4, columns
/// 2(l%4), 2(l%4)+1, in register i.
fn ldmatrix_x4(smem: &[u16], addr: &[u32; 32]) -> [[u32; 4]; 32] {
    let mut out = [[0u32; 4]; 32];
    for (l, regs) in out.iter_mut().enumerate() {
        for (i, reg) in regs.iter_mut().enumerate() {
            let row_addr = addr[8 * i + l / 4] as usize;
            assert_eq!(row_addr % 16, 0, "ldmatrix row address must be 16-byte aligned");
            let e = row_addr / 2 + 2 * (l % 4);
            *reg = smem[e] as u32 | (smem[e + 1] as u32) << 16;
        }
    }
    out
}

/// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, D = A·B + C (the
/// products exact, the sum in f64 here), fragments per the PTX ISA: a_i: row g (+8 for
/// i = 1, 3), cols 2t, 2t+1 (+8 for i = 2, 3); b_i: rows 2t, 2t+1 (+8 for i = 1), col g;
/// c: (c0, c1) row g, cols 2t, 2t+1; (c2, c3) row g+8.
pub(super) fn mma_16816(p: Precision, a: &[[u32; 4]; 32], b: &[[u32; 2]; 32], c: &mut [[f32; 4]; 32]) {
    let h2f = |h: u16| p.from_bits16(h);
    let mut am = [[0.0f32; 16]; 16];
    let mut bm = [[0.0f32; 8]; 16];
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for i in 0..4 {
            let row = g + if i % 2 == 1 { 8 } else { 0 };
            let col = 2 * t + if i >= 2 { 8 } else { 0 };
            am[row][col] = h2f(a[l][i] as u16);
            am[row][col + 1] = h2f((a[l][i] >> 16) as u16);
        }
        for i in 0..2 {
            let row = 2 * t + 8 * i;
            bm[row][g] = h2f(b[l][i] as u16);
            bm[row + 1][g] = h2f((b[l][i] >> 16) as u16);
        }
    }
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for i in 0..4 {
            let row = g + if i >= 2 { 8 } else { 0 };
            let col = 2 * t + i % 2;
            let mut s = c[l][i] as f64;
            for k in 0..16 {
                s += am[row][k] as f64 * bm[k][col] as f64;
            }
            c[l][i] = s as f32;
        }
    }
}

/// The tensor-core kernel's epilogue of one voxel (conv3_mma.cuh), in its order: lane t
/// sums (sp(z_2t) + one) + (sp(z_2t+1) + one) over its real channels, the quad's lanes
/// are added by xor-1 then (C_out = 8) xor-2 shuffles, m = Σ·(1/C_out).
fn mma_epilogue_voxel(a: &EmuArgs, o: &mut EmuOut, vox: usize, z: &[f32]) {
    let cout = z.len();
    if a.epi == Epi::Sp {
        for (dst, &v) in o.out[vox * cout..(vox + 1) * cout].iter_mut().zip(z) {
            *dst = v.softplus();
        }
        return;
    }
    let one = if a.epi == Epi::UpdatePlus1 { 1.0f32 } else { 0.0 };
    let lane: Vec<f32> = z
        .chunks(2)
        .map(|p| (p[0].softplus() + one) + (p[1].softplus() + one))
        .collect();
    let s = if cout == 8 {
        (lane[0] + lane[1]) + (lane[2] + lane[3])
    } else {
        lane[0] + lane[1]
    };
    let m = s * (1.0f32 / cout as f32);
    match a.epi {
        Epi::Mean => o.out[vox] = m,
        Epi::FpDiv => {
            let av = a.aux.unwrap()[vox];
            let q = av / ((m + av.softplus()) + a.eps);
            o.out[vox] = q * a.post.0 + a.post.1;
        }
        _ => {
            let e = m * a.aux.unwrap()[vox];
            o.raw[vox] = e;
            o.out[vox] = (e * a.post.0 + a.post.1).softplus();
        }
    }
}

/// conv3_mma (conv3_mma.cuh), every block, warp and lane, with operands of the 16-bit
/// type `p`. Multi-channel inputs must hold values representable in `p` (the kernel
/// reads them from storage of that type); one-channel f32 inputs are rounded here as
/// the kernel's gather does.
pub fn conv3_mma(a: &EmuArgs, f: &FoldedConv, p: Precision) -> EmuOut {
    let ci = a.conv_in();
    const TX: usize = 16;
    const TY: usize = 8;
    const TZ: usize = 8;
    const SX: usize = TX + 2;
    const SY: usize = TY + 2;
    const SZ: usize = TZ + 2;
    const NVOX: usize = SX * SY * SZ;
    const RG: usize = 4;
    let cin = f.c_in;
    let lay = mma_layout(cin);
    let vs = mma_voxel_halves(cin);
    let nch = mma_chunks(cin);
    let cout = f.c_out;
    let tapoff = |tap: usize| (tap / 9) * SY * SX + ((tap / 3) % 3) * SX + tap % 3;
    let wp = pack_mma_b(f, p);
    let bias = f.bias_f32();
    let mut o = new_out(a);
    let (gx, gy, gz) = tiled_grid(MMA_TILE, a.n, a.d, a.h, a.w).unwrap();
    let tiles_z = a.d.div_ceil(TZ);
    let mut s = vec![0xFFFFu16; (NVOX + 1) * vs]; // NaN poison
    for bz in 0..gz as usize {
        for by in 0..gy as usize {
            for bx in 0..gx as usize {
                let n = bz / tiles_z;
                let (z0, y0, x0) = ((bz - n * tiles_z) * TZ, by * TY, bx * TX);
                for sp in 0..=NVOX {
                    // rln_gather_mma: zeros outside the volume and beyond the channels
                    let mut ch = [0u16; 16];
                    if sp < NVOX {
                        let sz = sp / (SY * SX);
                        let r = sp - sz * (SY * SX);
                        let sy = r / SX;
                        let sx = r - sy * SX;
                        let (gz_, gy_, gx_) = ((z0 + sz) as isize - 1, (y0 + sy) as isize - 1, (x0 + sx) as isize - 1);
                        let zy_ok = gz_ >= 0 && (gz_ as usize) < a.d && gy_ >= 0 && (gy_ as usize) < a.h;
                        let row = if zy_ok {
                            ((n * a.d + gz_ as usize) * a.h + gy_ as usize) * a.w
                        } else {
                            0
                        };
                        let x_ok = |x: isize| x >= 0 && (x as usize) < a.w;
                        if zy_ok && lay == MmaLayout::X1 {
                            // the values of voxels gx .. gx + 7 of the row
                            for (j, v) in ch.iter_mut().enumerate().take(8) {
                                let x = gx_ + j as isize;
                                if x_ok(x) {
                                    *v = p.bits16(ci.load_concat(row + x as usize, 0));
                                }
                            }
                        } else if zy_ok && lay == MmaLayout::P4 {
                            // the voxel's 4 channels, then its x neighbour's
                            for (half, x) in [(0, gx_), (1, gx_ + 1)] {
                                if x_ok(x) {
                                    for c in 0..4 {
                                        ch[4 * half + c] = p.bits16(ci.load_concat(row + x as usize, c));
                                    }
                                }
                            }
                        } else if zy_ok && x_ok(gx_) {
                            let vox = row + gx_ as usize;
                            for (c, v) in ch.iter_mut().enumerate().take(cin) {
                                *v = p.bits16(ci.load_concat(vox, c));
                            }
                        }
                    }
                    s[sp * vs..sp * vs + 8].copy_from_slice(&ch[..8]);
                    if lay == MmaLayout::C16 {
                        s[sp * vs + 8..sp * vs + 16].copy_from_slice(&ch[8..]);
                    }
                }
                let zero_addr = (NVOX * vs * 2) as u32;
                for warp in 0..8 {
                    let mut lane_addr = [0u32; 32];
                    for (lane, la) in lane_addr.iter_mut().enumerate() {
                        let (lrow, khalf) = (lane & 15, lane >> 4);
                        let v0 = warp * SY * SX + lrow;
                        *la = (v0 * vs * 2) as u32
                            + match lay {
                                MmaLayout::C16 => (khalf * 16) as u32,
                                MmaLayout::P4 => (khalf * 2 * vs * 2) as u32,
                                MmaLayout::C8 | MmaLayout::X1 => 0,
                            };
                    }
                    let oz = z0 + warp;
                    for grp in 0..TY / RG {
                        let mut acc = vec![[[0.0f32; 4]; 32]; RG];
                        for kc in 0..nch {
                            let mut bfrag = [[0u32; 2]; 32];
                            for (lane, bf) in bfrag.iter_mut().enumerate() {
                                *bf = [wp[(kc * 32 + lane) * 2], wp[(kc * 32 + lane) * 2 + 1]];
                            }
                            for (r, acc) in acc.iter_mut().enumerate() {
                                let row_off = (grp * RG + r) * SX;
                                let mut addr = [0u32; 32];
                                for (lane, ad) in addr.iter_mut().enumerate() {
                                    let khalf = lane >> 4;
                                    *ad = if lay == MmaLayout::C16 {
                                        lane_addr[lane] + ((row_off + tapoff(kc)) * vs * 2) as u32
                                    } else if lay == MmaLayout::P4 {
                                        lane_addr[lane] + ((row_off + tapoff(3 * kc)) * vs * 2) as u32
                                    } else if lay == MmaLayout::X1 {
                                        let (q0, q1) = (2 * kc, 2 * kc + 1);
                                        let a0 = lane_addr[lane] + ((row_off + tapoff(3 * q0)) * vs * 2) as u32;
                                        let a1 = if q1 < 9 {
                                            lane_addr[lane] + ((row_off + tapoff(3 * q1)) * vs * 2) as u32
                                        } else {
                                            zero_addr
                                        };
                                        if khalf == 1 {
                                            a1
                                        } else {
                                            a0
                                        }
                                    } else {
                                        let (t0, t1) = (2 * kc, 2 * kc + 1);
                                        let a0 = lane_addr[lane] + ((row_off + tapoff(t0)) * vs * 2) as u32;
                                        let a1 = if t1 < 27 {
                                            lane_addr[lane] + ((row_off + tapoff(t1)) * vs * 2) as u32
                                        } else {
                                            zero_addr
                                        };
                                        if khalf == 1 {
                                            a1
                                        } else {
                                            a0
                                        }
                                    };
                                }
                                let frag = ldmatrix_x4(&s, &addr);
                                mma_16816(p, &frag, &bfrag, acc);
                            }
                        }
                        // epilogue
                        for (r, acc) in acc.iter().enumerate() {
                            let oy = y0 + grp * RG + r;
                            let row_ok = oz < a.d && oy < a.h;
                            let row_vox = ((n * a.d + oz) * a.h + oy) * a.w + x0;
                            // per voxel of the row: the 8 channels, gathered from the lanes
                            for x in 0..16 {
                                if !(row_ok && x0 + x < a.w) {
                                    continue;
                                }
                                let (g, hi) = (x % 8, x >= 8);
                                let mut z = [0.0f32; 8];
                                // lanes t < C_out/2 hold the real channels
                                for t in 0..cout / 2 {
                                    let lane = 4 * g + t;
                                    let (i0, i1) = if hi { (2, 3) } else { (0, 1) };
                                    z[2 * t] = acc[lane][i0] + bias[2 * t];
                                    z[2 * t + 1] = acc[lane][i1] + bias[2 * t + 1];
                                }
                                mma_epilogue_voxel(a, &mut o, row_vox + x, &z[..cout]);
                            }
                        }
                    }
                }
            }
        }
    }
    o
}

/// Converts an emulated output into N×C×D×H×W form.
pub fn out_tensor(o: &EmuOut, a: &EmuArgs) -> StageOut {
    let oc = if a.epi == Epi::Sp { a.c_out } else { 1 };
    let shape = Shape::new(a.n, oc, a.d, a.h, a.w);
    let raw =
        matches!(a.epi, Epi::Update | Epi::UpdatePlus1).then(|| from_channels_last(shape.with_c(1), &o.raw).unwrap());
    StageOut {
        out: from_channels_last(shape, &o.out).unwrap(),
        raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::launch::{conv_kernel, CONV_KERNELS};
    use crate::backend::cuda::random_model;
    use crate::backend::cuda::twin::conv_stage;
    use crate::backend::cuda::weights::{fold_conv, post_bn};
    use crate::model::{Model, L};
    use crate::tensor::rel_l2;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(shape: Shape, lo: f32, hi: f32, rng: &mut ChaCha8Rng) -> Tensor<f32> {
        Tensor::from_vec(shape, (0..shape.len()).map(|_| rng.random_range(lo..hi)).collect()).unwrap()
    }

    /// Random inputs for layer `l`'s stage: activations in (0, 2), the aux operand in (0, 1).
    /// Multi-channel inputs are rounded to the storage type `p` (the kernels read them
    /// from storage of that type).
    fn stage_inputs(l: L, s: Shape, p: Precision, rng: &mut ChaCha8Rng) -> (Vec<Tensor<f32>>, Option<Tensor<f32>>) {
        let k = conv_kernel(l);
        let inputs = k
            .inputs
            .iter()
            .map(|&c| {
                let t = random(s.with_c(c), 0.0, 2.0, rng);
                if c > 1 {
                    let shape = t.shape;
                    Tensor {
                        shape,
                        data: t.data.iter().map(|&v| p.round(v)).collect(),
                    }
                } else {
                    t
                }
            })
            .collect();
        let aux = k.post.map(|_| random(s.with_c(1), 0.05, 1.0, rng));
        (inputs, aux)
    }

    fn args<'a>(
        model: &Model<f32>,
        l: L,
        cl: &'a [(Vec<f32>, usize)],
        aux: Option<&'a [f32]>,
        s: Shape,
    ) -> EmuArgs<'a> {
        let k = conv_kernel(l);
        EmuArgs {
            inputs: cl.iter().map(|(v, c)| (v.as_slice(), *c)).collect(),
            aux,
            n: s.n,
            d: s.d,
            h: s.h,
            w: s.w,
            post: k.post.map(|p| post_bn(model, p)).unwrap_or((1.0, 0.0)),
            eps: model.config.div_eps as f32,
            c_out: k.c_out,
            epi: k.epi,
        }
    }

    /// The emulated kernel of layer `l` against its CPU twin: the FFMA kernel (f32) when
    /// `mma` is None, else the tensor-core kernel with operands of that type. Returns the
    /// rel L2 error.
    fn check(l: L, s: Shape, mma: Option<Precision>, tol: f64, seed: u64) -> f64 {
        let model = random_model(seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
        let (inputs, aux) = stage_inputs(l, s, mma.unwrap_or(Precision::F32), &mut rng);
        let refs: Vec<&Tensor<f32>> = inputs.iter().collect();
        let want = conv_stage(&model, l, &refs, aux.as_ref()).unwrap();
        let cl: Vec<(Vec<f32>, usize)> = inputs.iter().map(|t| (to_channels_last(t), t.shape.c)).collect();
        let aux_cl = aux.as_ref().map(to_channels_last);
        let a = args(&model, l, &cl, aux_cl.as_deref(), s);
        let f = fold_conv(&model, l);
        let o = match mma {
            Some(p) => conv3_mma(&a, &f, p),
            None => conv3_ffma(&a, &f),
        };
        let got = out_tensor(&o, &a);
        assert!(got.out.all_finite(), "{}: unwritten (NaN) outputs", l.spec().name);
        let e = rel_l2(&got.out.data, &want.out.data);
        let what = mma.map_or("ffma".to_string(), |p| format!("mma {p:?}"));
        println!("{} {what} {s}: rel L2 {e:.2e}", l.spec().name);
        assert!(e <= tol, "{} {what}: rel L2 {e:e} > {tol:e}", l.spec().name);
        if let (Some(g), Some(w)) = (&got.raw, &want.raw) {
            let e = rel_l2(&g.data, &w.data);
            assert!(e <= tol, "{} {what} raw: rel L2 {e:e}", l.spec().name);
        }
        e
    }

    #[test]
    fn ffma_kernels_match_their_twins() {
        // two tiles in every dimension (32×8×4 tile), batch 2, odd sizes
        let s = Shape::new(2, 1, 5, 9, 35);
        for (i, k) in CONV_KERNELS.iter().enumerate() {
            check(k.layer, s, None, 1e-5, 10 + i as u64);
        }
    }

    #[test]
    fn ffma_single_voxel_and_thin_volumes() {
        check(L::H3Conv3, Shape::new(1, 1, 1, 1, 1), None, 1e-5, 3);
        check(L::H1FpConv3, Shape::new(3, 1, 2, 1, 7), None, 1e-5, 4);
    }

    /// Tolerances: fp16 operands (the weights rounded to 11 significant bits, unit
    /// roundoff u = 2⁻¹¹ ≈ 4.9e-4) 3e-3, measured 1e-5…2.4e-4 before the 4-channel
    /// kernels; bf16 (8 significant bits, u = 2⁻⁸ ≈ 3.9e-3, 8× fp16's) 8× that, 2.4e-2.
    /// Every mma layer (the 4-channel ones: layouts P4 and C8 from 4‖4, C_out = 4 with
    /// the FpDiv and Update epilogues), the 4‖4 layer also at a width that is not a
    /// multiple of the tile and a single x column (the P4 neighbour at the volume's edge).
    #[test]
    fn mma_kernels_match_their_twins() {
        // two tiles in every dimension (16×8×8 tile), batch 2, odd sizes
        let s = Shape::new(2, 1, 9, 11, 19);
        for (p, tol) in [(Precision::F16, 3e-3), (Precision::Bf16, 2.4e-2)] {
            for (i, k) in CONV_KERNELS.iter().filter(|k| k.mma).enumerate() {
                check(k.layer, s, Some(p), tol, 20 + i as u64);
            }
            check(L::H3Conv2, Shape::new(1, 1, 3, 2, 5), Some(p), tol, 5);
            check(L::H2FpConv2, Shape::new(1, 1, 3, 2, 1), Some(p), tol, 6);
            check(L::H1BpConv4, Shape::new(1, 1, 2, 3, 17), Some(p), tol, 7);
        }
    }

    /// bf16 operands lose 3 more bits than fp16: the same layer's error is larger by
    /// about the ratio of the unit roundoffs (8×); a kernel that silently ran fp16
    /// arithmetic on bf16 bits (or the reverse) would be off by O(1) instead.
    #[test]
    fn bf16_error_is_about_eight_times_fp16s() {
        let s = Shape::new(1, 1, 8, 8, 16);
        for l in [L::H1BpConv4, L::H3Conv3] {
            let e16 = check(l, s, Some(Precision::F16), 3e-3, 40);
            let e8 = check(l, s, Some(Precision::Bf16), 2.4e-2, 40);
            println!(
                "{}: fp16 {e16:.2e}, bf16 {e8:.2e}, ratio {:.1}",
                l.spec().name,
                e8 / e16
            );
            assert!(
                e8 > 2.0 * e16 && e8 < 40.0 * e16,
                "{}: fp16 {e16:e}, bf16 {e8:e}",
                l.spec().name
            );
        }
    }

    #[test]
    fn mma_b_packing_roundtrips() {
        let model = random_model(7);
        for (k, prec) in CONV_KERNELS
            .iter()
            .filter(|k| k.mma)
            .flat_map(|k| [(k, Precision::F16), (k, Precision::Bf16)])
        {
            let f = fold_conv(&model, k.layer);
            let p = pack_mma_b(&f, prec);
            assert_eq!(p.len(), mma_chunks(f.c_in) * 64);
            // every real weight appears exactly once, everything else is zero
            let mut seen = 0usize;
            for chunk in 0..mma_chunks(f.c_in) {
                for lane in 0..32 {
                    for (r, kbase) in [(0, 2 * (lane % 4)), (1, 2 * (lane % 4) + 8)] {
                        let word = p[(chunk * 32 + lane) * 2 + r];
                        for (hi, kk) in [(0, kbase), (1, kbase + 1)] {
                            let v = prec.from_bits16((word >> (16 * hi)) as u16);
                            let want = crate::backend::cuda::weights::mma_b_value(&f, chunk, kk, lane / 4);
                            assert_eq!(v, prec.round(want as f32));
                            if want != 0.0 {
                                seen += 1;
                            }
                        }
                    }
                }
            }
            assert_eq!(seen, f.weight.iter().filter(|w| **w != 0.0).count(), "{}", k.base);
        }
    }
}
