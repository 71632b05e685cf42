//! Line-by-line CPU emulations of the training kernels whose index math is not obvious
//! (test-only): the conv forward tile (kernels/train_conv.cu `tconv_fwd`), the weight
//! gradient's thread/group mapping and block partials (`tconv_wgrad`), the one-channel-per-
//! thread block reductions (`t_chan_sum` + `rln_block_sum_by_channel` + `t_reduce_part`),
//! and up2's three kernels and `t_reshape`. Each runs with the host-side packing and grid
//! choices of train_launch.rs and is compared with the CPU backend, which checks the
//! layouts and formulas without a GPU. (What this cannot catch: a difference between these
//! lines and the .cu lines; keep them side by side.)

use super::train_launch::*;
use crate::tensor::Shape;

const TX: usize = 32;
const TY: usize = 8;
const TZ: usize = 4;
const VX: usize = 4;
const SX: usize = TX + 2;
const SY: usize = TY + 2;
const SZ: usize = TZ + 2;
const RS: usize = 38;
const PS: usize = SY * RS;
const CS: usize = SZ * PS;
const NPOS: usize = SZ * SY * SX;
const THREADS: usize = 256;
const TILE_V: usize = TX * TY * TZ;

/// Channels-last inputs of one launch, with their channel counts.
pub struct ConvIn<'a> {
    pub inputs: Vec<(&'a [f32], usize)>,
    pub s: Shape,
}

impl ConvIn<'_> {
    fn load_concat(&self, vox: usize, c: usize) -> f32 {
        let mut c = c;
        for (data, ch) in &self.inputs {
            if c < *ch {
                return data[vox * ch + c];
            }
            c -= ch;
        }
        0.0
    }
    fn cin(&self) -> usize {
        self.inputs.iter().map(|i| i.1).sum()
    }
    /// tconv::stage_tile
    fn stage_tile(&self, sin: &mut [f32], ck: usize, n: usize, z0: usize, y0: usize, x0: usize, c0: usize) {
        let s = self.s;
        for i in 0..ck * NPOS {
            let p = i / ck;
            let cc = i - p * ck;
            let sz = p / (SY * SX);
            let r = p - sz * (SY * SX);
            let sy = r / SX;
            let sx = r - sy * SX;
            let (gz, gy, gx) = ((z0 + sz) as isize - 1, (y0 + sy) as isize - 1, (x0 + sx) as isize - 1);
            let mut v = 0.0;
            if gz >= 0 && (gz as usize) < s.d && gy >= 0 && (gy as usize) < s.h && gx >= 0 && (gx as usize) < s.w {
                let vox = ((n * s.d + gz as usize) * s.h + gy as usize) * s.w + gx as usize;
                v = self.load_concat(vox, c0 + cc);
            }
            sin[cc * CS + sz * PS + sy * RS + sx] = v;
        }
    }
}

/// tconv_fwd with the identity epilogue (scale 1, shift 0): packed weights [ci][27][co].
pub fn tconv_fwd(a: &ConvIn, packed: &[f32], cout: usize) -> Vec<f32> {
    let s = a.s;
    let cin = a.cin();
    let ck = chunk(cin);
    let mut out = vec![f32::NAN; s.n * s.spatial() * cout];
    let (gx, gy, gz) = conv_grid(s);
    let tiles_z = s.d.div_ceil(TZ);
    let mut sin = vec![0.0f32; ck * CS];
    for bz in 0..gz as usize {
        for by in 0..gy as usize {
            for bx in 0..gx as usize {
                let n = bz / tiles_z;
                let (z0, y0, x0) = ((bz - n * tiles_z) * TZ, by * TY, bx * TX);
                let mut acc = vec![[[0.0f32; VX]; 16]; THREADS];
                for c0 in (0..cin).step_by(ck) {
                    a.stage_tile(&mut sin, ck, n, z0, y0, x0, c0);
                    for (tid, acc) in acc.iter_mut().enumerate() {
                        let (tx, ty, tz) = (tid & 7, (tid >> 3) & 7, tid >> 6);
                        for cc in 0..ck {
                            let wc = (c0 + cc) * 27 * cout;
                            let ic = cc * CS + tz * PS + ty * RS + tx * VX;
                            for kz in 0..3 {
                                for ky in 0..3 {
                                    let row = ic + kz * PS + ky * RS;
                                    let inp = &sin[row..row + VX + 2];
                                    for kx in 0..3 {
                                        let wk = wc + ((kz * 3 + ky) * 3 + kx) * cout;
                                        for c in 0..cout {
                                            for v in 0..VX {
                                                acc[c][v] = packed[wk + c].mul_add(inp[v + kx], acc[c][v]);
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                for (tid, acc) in acc.iter().enumerate() {
                    let (tx, ty, tz) = (tid & 7, (tid >> 3) & 7, tid >> 6);
                    let (z, y) = (z0 + tz, y0 + ty);
                    if z >= s.d || y >= s.h {
                        continue;
                    }
                    let row_vox = ((n * s.d + z) * s.h + y) * s.w;
                    for v in 0..VX {
                        let x = x0 + tx * VX + v;
                        if x < s.w {
                            for c in 0..cout {
                                out[(row_vox + x) * cout + c] = acc[c][v];
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// tconv_wgrad over the grid train.rs launches, then t_reduce_part: the weight gradient
/// in engine layout [co][ci][27].
pub fn tconv_wgrad(a: &ConvIn, dz: &[f32], cout: usize) -> Vec<f64> {
    let s = a.s;
    let cin = a.cin();
    let ck = chunk(cin);
    let ncol = ck * 9;
    let g_count = THREADS / ncol;
    let nw = cout * cin * 27;
    let chunks = cin / ck;
    let blocks = wgrad_blocks(conv_tiles(s), chunks);
    let (tiles_x, tiles_y, tiles_z) = (s.w.div_ceil(TX), s.h.div_ceil(TY), s.d.div_ceil(TZ));
    let ntiles = tiles_x * tiles_y * tiles_z * s.n;
    let mut part = vec![f64::NAN; blocks * nw];
    let mut sdz = vec![0.0f32; TILE_V * cout];
    let mut sin = vec![0.0f32; ck * CS];
    for by in 0..chunks {
        for bx in 0..blocks {
            let c0 = by * ck;
            let mut acc = vec![[[0.0f32; 16]; 3]; THREADS];
            let mut t = bx;
            while t < ntiles {
                let bxx = t % tiles_x;
                let byy = (t / tiles_x) % tiles_y;
                let bzn = t / (tiles_x * tiles_y);
                let n = bzn / tiles_z;
                let (z0, y0, x0) = ((bzn - n * tiles_z) * TZ, byy * TY, bxx * TX);
                for i in 0..TILE_V * cout {
                    let p = i / cout;
                    let c = i - p * cout;
                    let (lx, ly, lz) = (p % TX, (p / TX) % TY, p / (TX * TY));
                    let (gz, gy, gx) = (z0 + lz, y0 + ly, x0 + lx);
                    sdz[i] = if gz < s.d && gy < s.h && gx < s.w {
                        dz[(((n * s.d + gz) * s.h + gy) * s.w + gx) * cout + c]
                    } else {
                        0.0
                    };
                }
                a.stage_tile(&mut sin, ck, n, z0, y0, x0, c0);
                for (tid, acc) in acc.iter_mut().enumerate() {
                    let (col, g) = (tid % ncol, tid / ncol);
                    let (cc, kz, ky) = (col / 9, (col % 9) / 3, col % 3);
                    if g >= g_count {
                        continue;
                    }
                    let mut r = g;
                    while r < TY * TZ {
                        let (lz, ly) = (r / TY, r % TY);
                        let row = cc * CS + (lz + kz) * PS + (ly + ky) * RS;
                        let drow = r * TX * cout;
                        let (mut a0, mut a1) = (sin[row], sin[row + 1]);
                        for x in 0..TX {
                            let a2 = sin[row + x + 2];
                            for c in 0..cout {
                                let dv = sdz[drow + x * cout + c];
                                acc[0][c] = dv.mul_add(a0, acc[0][c]);
                                acc[1][c] = dv.mul_add(a1, acc[1][c]);
                                acc[2][c] = dv.mul_add(a2, acc[2][c]);
                            }
                            a0 = a1;
                            a1 = a2;
                        }
                        r += g_count;
                    }
                }
                t += blocks;
            }
            // red[(tid·3 + k)·COUT + c], then the groups in order
            let red = |tid: usize, rem: usize| acc[tid][rem / cout][rem % cout];
            for i in 0..ncol * 3 * cout {
                let col2 = i / (3 * cout);
                let rem = i - col2 * 3 * cout;
                let (kx, co) = (rem / cout, rem % cout);
                let mut sum = 0.0f64;
                for gg in 0..g_count {
                    sum += red(gg * ncol + col2, rem) as f64;
                }
                let (cc2, kz2, ky2) = (col2 / 9, (col2 % 9) / 3, col2 % 3);
                let ci = c0 + cc2;
                part[bx * nw + (co * cin + ci) * 27 + kz2 * 9 + ky2 * 3 + kx] = sum;
            }
        }
    }
    reduce_part(&part, blocks, nw, 1.0)
}

/// t_reduce_part: out[j] = scale · Σ_b part[b][j], threads b = tid + 256k, then the tree.
pub fn reduce_part(part: &[f64], blocks: usize, j_count: usize, scale: f64) -> Vec<f64> {
    (0..j_count)
        .map(|j| {
            let mut sred = [0.0f64; 256];
            for (tid, v) in sred.iter_mut().enumerate() {
                let mut b = tid;
                while b < blocks {
                    *v += part[b * j_count + j];
                    b += 256;
                }
            }
            let mut off = 128;
            while off > 0 {
                for t in 0..off {
                    sred[t] += sred[t + off];
                }
                off >>= 1;
            }
            sred[0] * scale
        })
        .collect()
}

/// t_chan_sum (mode 0, or mode 1 with `mean`) over the grid train.rs launches, with the
/// block reduction by channel, then t_reduce_part (scale 1/m): per-channel means or variances.
pub fn chan_sum(x: &[f32], c: usize, mean: Option<&[f64]>, m: f64) -> Vec<f64> {
    let count = x.len();
    let blocks = reduction_blocks(count);
    let mut part = vec![f64::NAN; blocks * c];
    for b in 0..blocks {
        // per-thread sums of the grid-stride loop
        let mut s = [0.0f64; 256];
        for (tid, st) in s.iter_mut().enumerate() {
            let ch = tid % c;
            let mut e = b * 256 + tid;
            while e < count {
                assert_eq!(e % c, ch, "a thread must see one channel only");
                let v = x[e] as f64;
                *st += match mean {
                    Some(mu) => (v - mu[ch]) * (v - mu[ch]),
                    None => v,
                };
                e += blocks * 256;
            }
        }
        // rln_block_sum_by_channel: shuffle-down tree per warp (offsets ≥ C), then warps
        let mut sred = [0.0f64; 8 * 32];
        for w in 0..8 {
            let mut v: Vec<f64> = s[w * 32..w * 32 + 32].to_vec();
            let mut off = 16;
            while off >= c {
                let old = v.clone();
                for lane in 0..32 {
                    // __shfl_down_sync: lanes past the end read their own value
                    v[lane] = old[lane] + if lane + off < 32 { old[lane + off] } else { old[lane] };
                }
                off >>= 1;
            }
            sred[w * 32..w * 32 + c].copy_from_slice(&v[..c]);
        }
        for ch in 0..c {
            part[b * c + ch] = (0..8).map(|w| sred[w * 32 + ch]).sum();
        }
    }
    reduce_part(&part, blocks, c, 1.0 / m)
}

/// t_up2_fwd (identity epilogue): x half size, channels-last; w engine layout.
pub fn up2_fwd(x: &[f32], s: Shape, w: &[f32], co: usize) -> Vec<f32> {
    let ci = s.c;
    let (od, oh, ow) = (2 * s.d, 2 * s.h, 2 * s.w);
    let count = s.n * od * oh * ow;
    let mut out = vec![f32::NAN; count * co];
    for ov in 0..count {
        let (ox, oy, oz) = (ov % ow, (ov / ow) % oh, (ov / (ow * oh)) % od);
        let n = ov / (ow * oh * od);
        let pqr = (oz & 1) * 4 + (oy & 1) * 2 + (ox & 1);
        let iv = ((n * s.d + (oz >> 1)) * s.h + (oy >> 1)) * s.w + (ox >> 1);
        for o in 0..co {
            let mut acc = 0.0f32;
            for c in 0..ci {
                acc = x[iv * ci + c].mul_add(w[(c * co + o) * 8 + pqr], acc);
            }
            out[ov * co + o] = acc;
        }
    }
    out
}

/// t_up2_bwd_data: dz full size (co channels); result half size s (ci channels).
pub fn up2_bwd_data(dz: &[f32], s: Shape, w: &[f32], co: usize) -> Vec<f32> {
    let ci = s.c;
    let (d2, h2, w2) = (2 * s.d, 2 * s.h, 2 * s.w);
    let mut out = vec![f32::NAN; s.len()];
    for (e, o_e) in out.iter_mut().enumerate() {
        let c_i = e % ci;
        let v = e / ci;
        let (k, j, i) = (v % s.w, (v / s.w) % s.h, (v / (s.w * s.h)) % s.d);
        let n = v / (s.w * s.h * s.d);
        let mut acc = 0.0f32;
        for o in 0..co {
            for p in 0..2 {
                for q in 0..2 {
                    let r0 = ((n * d2 + 2 * i + p) * h2 + 2 * j + q) * w2 + 2 * k;
                    let wk = ((c_i * co + o) * 2 + p) * 4 + q * 2;
                    acc += dz[r0 * co + o] * w[wk] + dz[(r0 + 1) * co + o] * w[wk + 1];
                }
            }
        }
        *o_e = acc;
    }
    out
}

/// t_up2_wgrad over chunks, then t_reduce_part: engine layout [in][out][2][2][2].
pub fn up2_wgrad(x: &[f32], s: Shape, dz: &[f32], co: usize) -> Vec<f64> {
    let ci = s.c;
    let hv = s.n * s.spatial();
    let chunks = hv.div_ceil(UP2_WGRAD_CHUNK);
    let nw = ci * co * 8;
    let (d2, h2, w2) = (2 * s.d, 2 * s.h, 2 * s.w);
    let mut part = vec![f64::NAN; chunks * nw];
    for e in 0..chunks * ci * 8 {
        let pqr = e % 8;
        let c_i = (e / 8) % ci;
        let ch = e / (8 * ci);
        let (p, q, r) = (pqr >> 2, (pqr >> 1) & 1, pqr & 1);
        let mut acc = [0.0f32; 16];
        for v in ch * UP2_WGRAD_CHUNK..hv.min((ch + 1) * UP2_WGRAD_CHUNK) {
            let (k, j, i) = (v % s.w, (v / s.w) % s.h, (v / (s.w * s.h)) % s.d);
            let n = v / (s.w * s.h * s.d);
            let t = x[v * ci + c_i];
            let ov = ((n * d2 + 2 * i + p) * h2 + 2 * j + q) * w2 + 2 * k + r;
            for (o, a) in acc.iter_mut().enumerate().take(co) {
                *a = t.mul_add(dz[ov * co + o], *a);
            }
        }
        for o in 0..co {
            part[ch * nw + (c_i * co + o) * 8 + pqr] = acc[o] as f64;
        }
    }
    reduce_part(&part, chunks, nw, 1.0)
}

/// t_reshape: mode 0 mirror pad, 1 crop, 2 uncrop (zeros outside); x of shape `src`.
pub fn reshape(x: &[f32], src: Shape, os: Shape, mode: i32) -> Vec<f32> {
    let c = src.c;
    let mirror = |i: usize, n: usize| if i < n { i } else { 2 * n - 1 - i };
    (0..os.len())
        .map(|e| {
            let ch = e % c;
            let v = e / c;
            let (x_, y, z) = (v % os.w, (v / os.w) % os.h, (v / (os.w * os.h)) % os.d);
            let n = v / (os.w * os.h * os.d);
            let (mut sz, mut sy, mut sx) = (z, y, x_);
            if mode == 0 {
                sz = mirror(z, src.d);
                sy = mirror(y, src.h);
                sx = mirror(x_, src.w);
            } else if mode == 2 && (z >= src.d || y >= src.h || x_ >= src.w) {
                return 0.0;
            }
            x[(((n * src.d + sz) * src.h + sy) * src.w + sx) * c + ch]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::{conv3, pointwise, up2, CpuEpilogue};
    use crate::tensor::{rel_l2, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(shape: Shape, rng: &mut ChaCha8Rng) -> Tensor<f32> {
        Tensor::from_vec(
            shape,
            (0..shape.len()).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
        )
        .unwrap()
    }

    /// Every specialized conv variant (and odd sizes that are not tile multiples) through
    /// the emulated forward and weight-gradient kernels, against the CPU backend.
    #[test]
    fn emulated_training_convs_match_the_cpu() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let shapes = [
            Shape::new(2, 1, 5, 9, 35),
            Shape::new(1, 1, 4, 8, 32),
            Shape::new(1, 1, 7, 3, 6),
        ];
        for (i, v) in FWD_VARIANTS.iter().enumerate() {
            let s = shapes[i % shapes.len()];
            let ins: Vec<Tensor<f32>> = v[..3]
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| random(s.with_c(c), &mut rng))
                .collect();
            let refs: Vec<&Tensor<f32>> = ins.iter().collect();
            let cin: usize = v[..3].iter().sum();
            let cout = v[3];
            let w: Vec<f32> = (0..cin * cout * 27).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let want = conv3::conv3_forward(&refs, &w, cout, &CpuEpilogue::identity(cout));
            let cl: Vec<Vec<f32>> = ins.iter().map(|t| t.to_ndhwc()).collect();
            let a = ConvIn {
                inputs: cl.iter().zip(&ins).map(|(d, t)| (d.as_slice(), t.shape.c)).collect(),
                s,
            };
            let got = Tensor::from_ndhwc(s.with_c(cout), &tconv_fwd(&a, &pack_fwd(&w, cin, cout), cout)).unwrap();
            let e = rel_l2(&got.data, &want.data);
            assert!(e < 1e-6, "fwd {v:?} at {s}: rel L2 {e:e}");

            if WGRAD_VARIANTS.contains(v) {
                let dz = random(s.with_c(cout), &mut rng);
                let want = conv3::conv3_backward_weight(&refs, &dz);
                let got = tconv_wgrad(&a, &dz.to_ndhwc(), cout);
                let e = rel_l2(&got, &want);
                assert!(e < 1e-6, "wgrad {v:?} at {s}: rel L2 {e:e}");
            }
        }
    }

    #[test]
    fn emulated_reductions_give_the_batch_statistics() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (c, s) in [
            (1, Shape::new(2, 1, 6, 10, 14)),
            (4, Shape::new(1, 4, 9, 9, 9)),
            (8, Shape::new(3, 8, 4, 6, 10)),
        ] {
            let _ = c;
            let z = random(s, &mut rng);
            let want = pointwise::batch_stats(&z);
            let cl = z.to_ndhwc();
            let m = (s.n * s.spatial()) as f64;
            let mean = chan_sum(&cl, s.c, None, m);
            let var = chan_sum(&cl, s.c, Some(&mean), m);
            for ch in 0..s.c {
                assert!((mean[ch] - want.mean[ch]).abs() < 1e-12, "mean {ch}");
                assert!((var[ch] - want.var[ch]).abs() < 1e-12 * want.var[ch], "var {ch}");
            }
        }
    }

    #[test]
    fn emulated_up2_and_reshape_match_the_cpu() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let s = Shape::new(2, 8, 3, 5, 4);
        let co = 4;
        let x = random(s, &mut rng);
        let w: Vec<f32> = (0..8 * co * 8).map(|_| rng.random_range(-0.5f32..0.5)).collect();
        let want = up2::up2_forward(&x, &w, co, &CpuEpilogue::identity(co));
        let got = Tensor::from_ndhwc(want.shape, &up2_fwd(&x.to_ndhwc(), s, &w, co)).unwrap();
        assert!(rel_l2(&got.data, &want.data) < 1e-6);
        let dz = random(want.shape, &mut rng);
        let want_dx = up2::up2_backward_data(&dz, &w, 8);
        let got = Tensor::from_ndhwc(s, &up2_bwd_data(&dz.to_ndhwc(), s, &w, co)).unwrap();
        assert!(rel_l2(&got.data, &want_dx.data) < 1e-6);
        let want_dw = up2::up2_backward_weight(&x, &dz);
        assert!(rel_l2(&up2_wgrad(&x.to_ndhwc(), s, &dz.to_ndhwc(), co), &want_dw) < 1e-6);

        let s = Shape::new(2, 3, 5, 4, 7);
        let x = random(s, &mut rng);
        let padded = pointwise::pad_even(&x);
        let got = Tensor::from_ndhwc(padded.shape, &reshape(&x.to_ndhwc(), s, padded.shape, 0)).unwrap();
        assert_eq!(got, padded);
        let small = Shape::new(2, 3, 3, 4, 2);
        let cropped = pointwise::crop(&x, small);
        let got = Tensor::from_ndhwc(small, &reshape(&x.to_ndhwc(), s, small, 1)).unwrap();
        assert_eq!(got, cropped);
        let un = pointwise::uncrop_zeros(&cropped, s);
        let got = Tensor::from_ndhwc(s, &reshape(&cropped.to_ndhwc(), small, s, 2)).unwrap();
        assert_eq!(got, un);
    }
}
