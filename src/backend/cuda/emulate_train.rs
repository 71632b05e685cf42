//! Line-by-line CPU emulations of the training kernels whose index math is not obvious
//! (test-only): the conv forward tile (`tconv_fwd` of kernels/conv_ffma.cuh, on the one tile
//! emulation of kernels/conv3_tile.cuh, emulate_tile.rs, shared with inference), the weight
//! gradient's thread/group mapping and block partials (`tconv_wgrad`), the one-channel-per-
//! thread block reductions (`t_chan_sum` + `rln_block_sum_by_channel` + `t_reduce_part`),
//! and up2's three kernels and `t_reshape`. Each runs with the host-side packing and grid
//! choices of train_launch.rs and is compared with the CPU backend, which checks the
//! layouts and formulas without a GPU. (What this cannot catch: a difference between these
//! lines and the .cu lines; keep them side by side.)

use super::emulate_tile::{self as tile, conv3_tile, ConvIn, CS, PS, RS, THREADS, TILE_V, TX, TY, TZ};
use super::train_launch::*;
use crate::real::Real;
use crate::tensor::Shape;

/// tconv_fwd (conv_ffma.cuh) with the identity epilogue (scale 1, shift 0): the shared tile
/// emulation (emulate_tile.rs) over the grid train_launch.rs computes; packed weights
/// [ci][27][co]. With flipped, transposed weights it is the data gradient, as on the device.
pub fn tconv_fwd(a: &ConvIn, packed: &[f32], cout: usize) -> Vec<f32> {
    let s = a.s;
    assert_eq!(
        chunk(a.cin()),
        tile::chunk(a.cin()),
        "train_launch::chunk is conv3::chunk"
    );
    let mut out = vec![f32::NAN; s.n * s.spatial() * cout];
    conv3_tile(a, packed, cout, conv_grid(s), |vox, z| {
        out[vox * cout..(vox + 1) * cout].copy_from_slice(z);
    });
    out
}

/// tconv_wgrad over the grid train.rs launches, then t_reduce_part: the weight gradient
/// in engine layout [co][ci][27].
pub fn tconv_wgrad(a: &ConvIn, dz: &[f32], cout: usize) -> Vec<f64> {
    let cin = a.cin();
    let blocks = wgrad_blocks(conv_tiles(a.s), cin / chunk(cin));
    let part = tconv_wgrad_partials(a, dz, cout, blocks);
    reduce_part(&part, blocks, cout * cin * 27, 1.0)
}

/// What one tconv_wgrad launch with grid (blocks, C_in / CK) writes: part[block][NW].
pub fn tconv_wgrad_partials(a: &ConvIn, dz: &[f32], cout: usize, blocks: usize) -> Vec<f64> {
    let s = a.s;
    let cin = a.cin();
    let ck = chunk(cin);
    let ncol = ck * 9;
    let g_count = THREADS / ncol;
    let nw = cout * cin * 27;
    let chunks = cin / ck;
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
    part
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
    let part = block_sums(count, blocks, c, 1, |e, ch, s| {
        let v = x[e] as f64;
        s[0] += match mean {
            Some(mu) => (v - mu[ch]) * (v - mu[ch]),
            None => v,
        };
    });
    reduce_part(&part, blocks, c, 1.0 / m)
}

/// The block partials of a reduction kernel: every thread walks its grid-stride elements
/// (channel tid % C, checked), adding into its `k` sums with `f(e, channel, sums)`; then
/// `rln_block_sum_by_channel` per quantity. Returns part[block][q·C + channel].
pub fn block_sums(
    count: usize,
    blocks: usize,
    c: usize,
    k: usize,
    mut f: impl FnMut(usize, usize, &mut [f64; 5]),
) -> Vec<f64> {
    let mut part = vec![f64::NAN; blocks * k * c];
    for b in 0..blocks {
        let mut s = vec![[0.0f64; 5]; 256];
        for (tid, st) in s.iter_mut().enumerate() {
            let ch = tid % c;
            let mut e = b * 256 + tid;
            while e < count {
                assert_eq!(e % c, ch, "a thread must see one channel only");
                f(e, ch, st);
                e += blocks * 256;
            }
        }
        for q in 0..k {
            let vals: Vec<f64> = s.iter().map(|st| st[q]).collect();
            let r = block_sum_by_channel(&vals, c);
            part[b * k * c + q * c..b * k * c + (q + 1) * c].copy_from_slice(&r);
        }
    }
    part
}

/// rln_block_sum_by_channel over the 256 values of a block's threads: shuffle-down tree
/// per warp (offsets ≥ C), then the warps in order; channel c's sum at [c].
pub fn block_sum_by_channel(vals: &[f64], c: usize) -> Vec<f64> {
    assert_eq!(vals.len(), 256, "one value per thread");
    let mut sred = [0.0f64; 8 * 32];
    for w in 0..8 {
        let mut v: Vec<f64> = vals[w * 32..(w + 1) * 32].to_vec();
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
    (0..c)
        .map(|ch| {
            let mut s = 0.0f64;
            for w in 0..8 {
                s += sred[w * 32 + ch];
            }
            s
        })
        .collect()
}

/// Which forward conv kernel's thread mapping the epilogue statistics follow.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StatsMapping {
    /// tconv_fwd (conv3_tile.cuh): thread tx + 8·ty + 64·tz owns VX x-voxels, all channels.
    Fp32,
    /// tmma_fwd (conv_mma_train.cuh): warp lz, lane 4g + t owns x = g and g + 8, channels
    /// 2t and 2t + 1.
    Mma,
}

/// The batch-statistics partials a forward conv's epilogue writes with EPI_STATS
/// (TrainConvEpi::end, tmma_fwd): y = the epilogue's outputs [vox][C]; each thread sums
/// y and y² of its voxels in order, per channel, then the block reduction. Returns
/// part[block][2·C] = [Σ y | Σ y²], block = bx + gx·(by + gy·bz).
pub fn epi_stats_partials(y: &[f32], s: Shape, cout: usize, map: StatsMapping) -> Vec<f64> {
    let (grid, [tz_, ty_, tx_]) = match map {
        StatsMapping::Fp32 => (conv_grid(s), [TZ, TY, TX]),
        StatsMapping::Mma => (mma_grid(s), MMA_TILE),
    };
    let tiles_z = s.d.div_ceil(tz_);
    let blocks = grid_blocks(grid);
    // per block, thread, channel: [Σ y, Σ y²]
    let mut acc = vec![[0.0f64; 2]; blocks * 256 * cout];
    for n in 0..s.n {
        for z in 0..s.d {
            for yy in 0..s.h {
                for x in 0..s.w {
                    let vox = ((n * s.d + z) * s.h + yy) * s.w + x;
                    let blk = x / tx_ + grid.0 as usize * (yy / ty_ + grid.1 as usize * (n * tiles_z + z / tz_));
                    for c in 0..cout {
                        let tid = match map {
                            StatsMapping::Fp32 => (x % TX) / tile::VX + 8 * (yy % TY) + 64 * (z % TZ),
                            StatsMapping::Mma => 32 * (z % MMA_TILE[0]) + 4 * (x % 8) + c / 2,
                        };
                        let v = y[vox * cout + c] as f64;
                        let a = &mut acc[(blk * 256 + tid) * cout + c];
                        a[0] += v;
                        a[1] += v * v;
                    }
                }
            }
        }
    }
    let mut part = vec![f64::NAN; blocks * 2 * cout];
    for b in 0..blocks {
        for q in 0..2 {
            match map {
                StatsMapping::Fp32 => {
                    for c in 0..cout {
                        let vals: Vec<f64> = (0..256).map(|t| acc[(b * 256 + t) * cout + c][q]).collect();
                        part[b * 2 * cout + q * cout + c] = block_sum_by_channel(&vals, 1)[0];
                    }
                }
                StatsMapping::Mma => {
                    for j in 0..2 {
                        // thread t's channel 2t + j (0 for a channel past C_out)
                        let vals: Vec<f64> = (0..256)
                            .map(|t| {
                                let c = 2 * (t % 4) + j;
                                if c < cout {
                                    acc[(b * 256 + t) * cout + c][q]
                                } else {
                                    0.0
                                }
                            })
                            .collect();
                        let r = block_sum_by_channel(&vals, 4);
                        for (t, &v) in r.iter().enumerate() {
                            if 2 * t + j < cout {
                                part[b * 2 * cout + q * cout + 2 * t + j] = v;
                            }
                        }
                    }
                }
            }
        }
    }
    part
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
    let chunks = (s.n * s.spatial()).div_ceil(UP2_WGRAD_CHUNK);
    reduce_part(
        &up2_wgrad_partials(x, s, dz, co, UP2_WGRAD_CHUNK),
        chunks,
        s.c * co * 8,
        1.0,
    )
}

/// What t_up2_wgrad writes with chunks of `chunk` voxels: part[chunk][in·CO·8 + o·8 + pqr].
pub fn up2_wgrad_partials(x: &[f32], s: Shape, dz: &[f32], co: usize, chunk: usize) -> Vec<f64> {
    let ci = s.c;
    let hv = s.n * s.spatial();
    let chunks = hv.div_ceil(chunk);
    let nw = ci * co * 8;
    let (d2, h2, w2) = (2 * s.d, 2 * s.h, 2 * s.w);
    let mut part = vec![f64::NAN; chunks * nw];
    for e in 0..chunks * ci * 8 {
        let pqr = e % 8;
        let c_i = (e / 8) % ci;
        let ch = e / (8 * ci);
        let (p, q, r) = (pqr >> 2, (pqr >> 1) & 1, pqr & 1);
        let mut acc = [0.0f32; 16];
        for v in ch * chunk..hv.min((ch + 1) * chunk) {
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
    part
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

// ---------------------------------------------------------------- the emulated device

/// A typed view of emulated device memory through a raw pointer, bounds-checked against
/// the allocation it points into (kernels read and write overlapping buffers in place, so
/// no Rust references are formed).
#[derive(Clone, Copy)]
struct Buf<T> {
    p: *mut T,
    len: usize,
}

impl<T: Copy> Buf<T> {
    fn get(&self, i: usize) -> T {
        assert!(
            i < self.len,
            "emulated kernel reads element {i} of a buffer of {}",
            self.len
        );
        // SAFETY: p points to at least len elements of a live allocation (checked in buf()).
        unsafe { self.p.add(i).read_unaligned() }
    }
    fn set(&self, i: usize, v: T) {
        assert!(
            i < self.len,
            "emulated kernel writes element {i} of a buffer of {}",
            self.len
        );
        // SAFETY: as in get.
        unsafe { self.p.add(i).write_unaligned(v) }
    }
    fn to_vec(self, n: usize) -> Vec<T> {
        (0..n).map(|i| self.get(i)).collect()
    }
}

/// The training kernels run on the CPU, one launch at a time, on host memory that plays
/// device memory (pointers are host addresses). Every launch is checked against what
/// train_launch.rs says (grids, shared memory) and executed with the emulations above or
/// a direct transcription of the .cu kernel.
#[derive(Default)]
pub struct EmuExec {
    mem: std::sync::Mutex<std::collections::HashMap<u64, Box<[u64]>>>,
    pub launches: std::sync::Mutex<Vec<String>>,
    /// Device-to-host copies (each one a synchronization on the real device), host-to-device copies.
    pub dtoh_count: std::sync::atomic::AtomicUsize,
    pub htod_count: std::sync::atomic::AtomicUsize,
    /// Device memory of this size (bytes live at once): an allocation beyond it fails as
    /// the driver does, with CUDA_ERROR_OUT_OF_MEMORY. `None`: unlimited.
    pub memory_limit: Option<usize>,
    live_bytes: std::sync::atomic::AtomicUsize,
    /// The capture under way: what it recorded, and the allocations it made.
    capture: std::sync::Mutex<Option<EmuGraph>>,
    /// Captured graphs by id.
    graphs: std::sync::Mutex<std::collections::HashMap<u64, EmuGraph>>,
    /// Graph replays run.
    pub replays: std::sync::atomic::AtomicUsize,
    /// Staged (pinned, copy-stream) batch uploads, and per slot whether its last upload
    /// awaits a step's read ([`super::runtime::Exec::staged_read`]).
    pub staged_uploads: std::sync::atomic::AtomicUsize,
    staged: std::sync::Mutex<std::collections::HashMap<usize, bool>>,
}

/// One recorded operation of an emulated graph.
enum EmuOp {
    Launch {
        name: String,
        grid: (u32, u32, u32),
        smem: usize,
        args: Box<TrainArgs>,
    },
    Memset {
        ptr: u64,
        v: u8,
        bytes: usize,
    },
}

/// An emulated graph: its operations in stream order, and the memory allocated during
/// its capture, which it owns (as a CUDA graph's memory nodes: the same addresses in every
/// replay) until it is dropped.
#[derive(Default)]
struct EmuGraph {
    ops: Vec<EmuOp>,
    owned: Vec<u64>,
    /// Those of `owned` the host freed during the capture (the graph keeps them).
    freed: std::collections::HashSet<u64>,
}

impl EmuExec {
    fn buf<T>(&self, ptr: u64) -> Buf<T> {
        if ptr == 0 {
            return Buf {
                p: std::ptr::null_mut(),
                len: 0,
            };
        }
        let mem = self.mem.lock().unwrap();
        let (base, a) = mem
            .iter()
            .find(|(&b, a)| ptr >= b && ptr < b + 8 * a.len() as u64)
            .unwrap_or_else(|| panic!("pointer {ptr:#x} is not in an emulated allocation"));
        let avail = (*base + 8 * a.len() as u64 - ptr) as usize;
        Buf {
            p: ptr as *mut T,
            len: avail / std::mem::size_of::<T>(),
        }
    }
}

fn sp(v: f32) -> f32 {
    v.softplus()
}

/// rln_train_epi
fn epi(a: &TrainArgs, z: f32, c: usize, vox: usize, aux: Buf<f32>) -> f32 {
    let mut v = z * a.p[0][c] + a.p[1][c];
    if a.mode & EPI_SOFTPLUS != 0 {
        v = sp(v);
    }
    match (a.mode >> 1) & 3 {
        1 => v += a.f[0],
        2 => v += sp(aux.get(vox)),
        _ => {}
    }
    v
}

/// rln_bn_param: the parameters p[k] of a batch-norm kernel read from device memory `wt`.
fn bn_param(wt: Buf<f32>, a: &TrainArgs, k: usize) -> [f32; 16] {
    let mut p = a.p[k];
    (0..16).for_each(|c| p[c] = wt.get(16 * k + c));
    p
}

fn sigmoid(t: f32) -> f32 {
    t.sigmoid()
}

impl super::train::Exec for EmuExec {
    fn alloc(&self, bytes: usize) -> crate::Result<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let words = bytes.div_ceil(8);
        let live = self.live_bytes.load(Relaxed);
        if self.memory_limit.is_some_and(|limit| live + 8 * words > limit) {
            let oom = cudarc::driver::DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY);
            return Err(super::device::driver_error(
                &format!("allocating {} MiB of device memory", bytes.div_ceil(1 << 20)),
                oom,
            ));
        }
        self.live_bytes.fetch_add(8 * words, Relaxed);
        let b: Box<[u64]> = vec![0u64; words].into_boxed_slice();
        let p = b.as_ptr() as u64;
        self.mem.lock().unwrap().insert(p, b);
        if let Some(g) = self.capture.lock().unwrap().as_mut() {
            g.owned.push(p);
        }
        Ok(p)
    }
    fn free(&self, ptr: u64) {
        if let Some(g) = self.capture.lock().unwrap().as_mut() {
            if g.owned.contains(&ptr) {
                g.freed.insert(ptr);
                return; // the graph keeps it: every replay uses the same address
            }
        }
        self.release(ptr)
    }
    fn memset(&self, ptr: u64, v: u8, bytes: usize) -> crate::Result<()> {
        if let Some(g) = self.capture.lock().unwrap().as_mut() {
            g.ops.push(EmuOp::Memset { ptr, v, bytes });
            return Ok(());
        }
        self.fill(ptr, v, bytes);
        Ok(())
    }
    fn htod(&self, dst: u64, src: &[u8]) -> crate::Result<()> {
        self.htod_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let b = self.buf::<u8>(dst);
        src.iter().enumerate().for_each(|(i, &v)| b.set(i, v));
        Ok(())
    }
    fn dtoh(&self, dst: &mut [u8], src: u64) -> crate::Result<()> {
        self.dtoh_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let b = self.buf::<u8>(src);
        dst.iter_mut().enumerate().for_each(|(i, v)| *v = b.get(i));
        Ok(())
    }
    /// The copy itself is immediate here; what is checked is the host's protocol: a
    /// slot is uploaded again only after a step that read it was marked (on the device
    /// the copy would otherwise overwrite a batch a queued step has not read yet).
    fn htod_staged(&self, slot: usize, dst: u64, src: &[u8]) -> crate::Result<()> {
        let mut st = self.staged.lock().unwrap();
        if st.get(&slot) == Some(&true) {
            return Err(crate::Error::Cuda(format!(
                "batch buffer slot {slot} uploaded again before a step read it"
            )));
        }
        st.insert(slot, true);
        self.staged_uploads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.htod(dst, src)
    }
    fn staged_read(&self, slot: usize) -> crate::Result<()> {
        self.staged.lock().unwrap().insert(slot, false);
        Ok(())
    }
    fn synchronize(&self) -> crate::Result<()> {
        Ok(())
    }
    fn launch(&self, name: &str, grid: (u32, u32, u32), smem: usize, a: &TrainArgs) -> crate::Result<()> {
        if let Some(g) = self.capture.lock().unwrap().as_mut() {
            g.ops.push(EmuOp::Launch {
                name: name.to_string(),
                grid,
                smem,
                args: Box::new(*a),
            });
            return Ok(());
        }
        self.execute(name, grid, smem, a)
    }
    fn begin_capture(&self) -> crate::Result<()> {
        *self.capture.lock().unwrap() = Some(EmuGraph::default());
        Ok(())
    }
    fn end_capture(&self) -> crate::Result<u64> {
        let g = self.capture.lock().unwrap().take().expect("a capture under way");
        let mut graphs = self.graphs.lock().unwrap();
        let id = (1..).find(|k| !graphs.contains_key(k)).expect("a free id");
        graphs.insert(id, g);
        Ok(id)
    }
    fn abort_capture(&self) {
        if let Some(g) = self.capture.lock().unwrap().take() {
            self.release_graph(g);
        }
    }
    fn replay(&self, graph: u64) -> crate::Result<()> {
        self.replays.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let graphs = self.graphs.lock().unwrap();
        let g = graphs.get(&graph).expect("a captured graph");
        for op in &g.ops {
            match op {
                EmuOp::Launch { name, grid, smem, args } => self.execute(name, *grid, *smem, args)?,
                EmuOp::Memset { ptr, v, bytes } => self.fill(*ptr, *v, *bytes),
            }
        }
        Ok(())
    }
    fn drop_graph(&self, graph: u64) {
        let g = self.graphs.lock().unwrap().remove(&graph);
        if let Some(g) = g {
            self.release_graph(g);
        }
    }
}

impl EmuExec {
    /// Returns the memory a graph kept: what the host freed during its capture (what it
    /// has not freed yet stays an ordinary allocation, freed by the host later).
    fn release_graph(&self, g: EmuGraph) {
        g.owned
            .iter()
            .filter(|p| g.freed.contains(p))
            .for_each(|&p| self.release(p));
    }

    /// Returns an allocation's memory.
    fn release(&self, ptr: u64) {
        let b = self
            .mem
            .lock()
            .unwrap()
            .remove(&ptr)
            .expect("free of an unknown pointer");
        self.live_bytes
            .fetch_sub(8 * b.len(), std::sync::atomic::Ordering::Relaxed);
    }

    fn fill(&self, ptr: u64, v: u8, bytes: usize) {
        let b = self.buf::<u8>(ptr);
        (0..bytes).for_each(|i| b.set(i, v));
    }

    /// Runs one launch now.
    fn execute(&self, name: &str, grid: (u32, u32, u32), smem: usize, a: &TrainArgs) -> crate::Result<()> {
        self.launches.lock().unwrap().push(name.to_string());
        // the batch-norm gradient kernels with their parameters in device memory
        // (rln_bn_param): read them into the parameter block
        let with_params;
        let a = if matches!(name, "t_epi_bwd1" | "t_epi_bwd2") && a.wt != 0 {
            let mut b = *a;
            b.wt = 0;
            for k in 0..4 {
                b.p[k] = bn_param(self.buf::<f32>(a.wt), a, k);
            }
            with_params = b;
            &with_params
        } else {
            a
        };
        let f = |i: usize| self.buf::<f32>(a.inp[i]);
        let o = |i: usize| self.buf::<f32>(a.out[i]);
        let part = self.buf::<f64>(a.part);
        let stat = self.buf::<f64>(a.stat);
        let count = a.count as usize;
        let (n, d, h, w) = (a.n as usize, a.d as usize, a.h as usize, a.w as usize);
        let (ca, cb, cc, cout) = (a.ca as usize, a.cb as usize, a.cc as usize, a.cout as usize);
        let vol = Shape::new(n, 1, d, h, w);
        let voxels = n * d * h * w;
        let cmean = |t: Buf<f32>, v: usize, c: usize| {
            let mut s = 0.0f32;
            for k in 0..c {
                s += t.get(v * c + k);
            }
            s * (1.0 / c as f32)
        };
        if let Some(rest) = name.strip_prefix("tmma_") {
            // the mixed-precision tensor-core convs (emulate_train_mma.rs)
            let (kind, rest) = rest.split_once('_').unwrap();
            let rest = rest.strip_suffix("_bf16").expect("tmma kernels are bf16");
            let v: Vec<usize> = rest.split('_').map(|t| t.parse().unwrap()).collect();
            assert_eq!(v, [ca, cb, cc, cout], "{name} launched with other channel counts");
            assert!(
                MMA_VARIANTS.contains(&[ca, cb, cc, cout]),
                "{name}: not a mixed-precision variant"
            );
            let cin = ca + cb + cc;
            let ins: Vec<Vec<f32>> = (0..3)
                .filter(|&i| [ca, cb, cc][i] > 0)
                .map(|i| f(i).to_vec(voxels * [ca, cb, cc][i]))
                .collect();
            let ci = ConvIn {
                inputs: ins
                    .iter()
                    .zip([ca, cb, cc].iter().filter(|&&c| c > 0))
                    .map(|(d, &c)| (d.as_slice(), c))
                    .collect(),
                s: vol,
            };
            let p = super::Precision::Bf16;
            if kind == "fwd" {
                assert_eq!(grid, mma_grid(vol), "{name}: grid");
                assert_eq!(smem, mma_fwd_smem_bytes(cin), "{name}: shared memory");
                let packed = self.buf::<f32>(a.wt).to_vec(cin * 27 * cout);
                super::emulate_train_mma::tmma_fwd(&ci, &packed, cout, p, |vox, co, z| {
                    o(0).set(vox * cout + co, epi(a, z, co, vox, f(3)))
                });
                if a.mode & EPI_STATS != 0 {
                    let y = o(0).to_vec(voxels * cout);
                    let pp = epi_stats_partials(&y, vol, cout, StatsMapping::Mma);
                    pp.iter().enumerate().for_each(|(i, &v)| part.set(i, v));
                }
            } else {
                assert_eq!(kind, "wgrad", "{name}");
                assert_eq!((grid.1, grid.2), (1, 1), "{name}: one grid row");
                assert_eq!(smem, mma_wgrad_smem_bytes(cin), "{name}: shared memory");
                let dz = f(3).to_vec(voxels * cout);
                let pp = super::emulate_train_mma::tmma_wgrad_partials(&ci, &dz, cout, grid.0 as usize, p);
                pp.iter().enumerate().for_each(|(i, &v)| part.set(i, v));
            }
            return Ok(());
        }
        if let Some(rest) = name.strip_prefix("tconv_fwd_").filter(|r| *r != "any") {
            let v: Vec<usize> = rest.split('_').map(|t| t.parse().unwrap()).collect();
            assert_eq!(v, [ca, cb, cc, cout], "{name} launched with other channel counts");
            let cin = ca + cb + cc;
            assert_eq!(grid, conv_grid(vol), "{name}: grid");
            assert_eq!(smem, fwd_smem_bytes(cin, cout), "{name}: shared memory");
            let ins: Vec<Vec<f32>> = [ca, cb, cc]
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| f(i).to_vec(voxels * c))
                .collect();
            let ci = ConvIn {
                inputs: ins
                    .iter()
                    .zip([ca, cb, cc].iter().filter(|&&c| c > 0))
                    .map(|(d, &c)| (d.as_slice(), c))
                    .collect(),
                s: vol,
            };
            let packed = self.buf::<f32>(a.wt).to_vec(cin * 27 * cout);
            let acc = tconv_fwd(&ci, &packed, cout);
            for (e, &z) in acc.iter().enumerate() {
                o(0).set(e, epi(a, z, e % cout, e / cout, f(3)));
            }
            if a.mode & EPI_STATS != 0 {
                let y = o(0).to_vec(voxels * cout);
                let pp = epi_stats_partials(&y, vol, cout, StatsMapping::Fp32);
                pp.iter().enumerate().for_each(|(i, &v)| part.set(i, v));
            }
            return Ok(());
        }
        if let Some(rest) = name.strip_prefix("tconv_wgrad_").filter(|r| *r != "any") {
            let v: Vec<usize> = rest.split('_').map(|t| t.parse().unwrap()).collect();
            assert_eq!(v, [ca, cb, cc, cout], "{name} launched with other channel counts");
            let cin = ca + cb + cc;
            assert_eq!(
                grid.1 as usize,
                cin / chunk(cin),
                "{name}: one grid row per channel chunk"
            );
            assert_eq!(smem, wgrad_smem_bytes(cin, cout), "{name}: shared memory");
            let ins: Vec<Vec<f32>> = (0..3)
                .filter(|&i| [ca, cb, cc][i] > 0)
                .map(|i| f(i).to_vec(voxels * [ca, cb, cc][i]))
                .collect();
            let ci = ConvIn {
                inputs: ins
                    .iter()
                    .zip([ca, cb, cc].iter().filter(|&&c| c > 0))
                    .map(|(d, &c)| (d.as_slice(), c))
                    .collect(),
                s: vol,
            };
            let p = tconv_wgrad_partials(&ci, &f(3).to_vec(voxels * cout), cout, grid.0 as usize);
            p.iter().enumerate().for_each(|(i, &v)| part.set(i, v));
            return Ok(());
        }
        // the run-time-channel and elementwise kernels: the .cu loops, transcribed
        let src = |ci: usize| -> (Buf<f32>, usize, usize) {
            if ci < ca {
                (f(0), ca, ci)
            } else if ci < ca + cb {
                (f(1), cb, ci - ca)
            } else {
                (f(2), cc, ci - ca - cb)
            }
        };
        let decode = |v: usize| (v % w, (v / w) % h, (v / (w * h)) % d, v / (w * h * d));
        match name {
            "tconv_fwd_any" => {
                let cin = ca + cb + cc;
                for e in 0..count {
                    let (co, vox) = (e % cout, e / cout);
                    let (x, y, z, nn) = decode(vox);
                    let mut acc = 0.0f32;
                    for c_i in 0..cin {
                        let (t, cs, cl) = src(c_i);
                        for k in 0..27 {
                            let (gz, gy, gx) = (z + k / 9, y + (k / 3) % 3, x + k % 3);
                            if gz < 1 || gz > d || gy < 1 || gy > h || gx < 1 || gx > w {
                                continue;
                            }
                            let v = ((nn * d + gz - 1) * h + gy - 1) * w + gx - 1;
                            acc = self
                                .buf::<f32>(a.wt)
                                .get((c_i * 27 + k) * cout + co)
                                .mul_add(t.get(v * cs + cl), acc);
                        }
                    }
                    o(0).set(e, epi(a, acc, co, vox, f(3)));
                }
            }
            "tconv_wgrad_any" => {
                let cin = ca + cb + cc;
                let nw = cout * cin * 27;
                for e in 0..count {
                    let (chunk_i, wi) = (e / nw, e % nw);
                    let (co, c_i, k) = (wi / (cin * 27), (wi / 27) % cin, wi % 27);
                    let (t, cs, cl) = src(c_i);
                    let mut s = 0.0f64;
                    for vox in chunk_i * a.k0 as usize..voxels.min((chunk_i + 1) * a.k0 as usize) {
                        let (x, y, z, nn) = decode(vox);
                        let (gz, gy, gx) = (z + k / 9, y + (k / 3) % 3, x + k % 3);
                        if gz < 1 || gz > d || gy < 1 || gy > h || gx < 1 || gx > w {
                            continue;
                        }
                        let v = ((nn * d + gz - 1) * h + gy - 1) * w + gx - 1;
                        s += (f(3).get(vox * cout + co) * t.get(v * cs + cl)) as f64;
                    }
                    part.set(e, s);
                }
            }
            "t_epilogue" => {
                let mut b = *a;
                if a.wt != 0 {
                    b.p[0] = bn_param(self.buf::<f32>(a.wt), a, 0);
                    b.p[1] = bn_param(self.buf::<f32>(a.wt), a, 1);
                }
                (0..count).for_each(|e| o(0).set(e, epi(&b, f(0).get(e), e % ca, e / ca, f(3))))
            }
            "t_bn_fold" => {
                assert_eq!(grid, (1, 1, 1), "t_bn_fold: one block");
                for c in 0..ca {
                    if a.mode == 1 {
                        // E[z²] from the conv epilogue's sums → the biased variance
                        let m = stat.get(c);
                        stat.set(ca + c, (stat.get(ca + c) - m * m).max(0.0));
                    }
                    let (mean, var) = (stat.get(c), stat.get(ca + c));
                    let (g, b) = (f(0).get(c) as f64, f(1).get(c) as f64);
                    let inv_std = 1.0 / (var + a.dc[0]).sqrt();
                    o(0).set(c, (g * inv_std) as f32);
                    o(0).set(16 + c, (b - mean * g * inv_std) as f32);
                    o(0).set(32 + c, f(0).get(c));
                    o(0).set(48 + c, f(1).get(c));
                    o(0).set(64 + c, mean as f32);
                    o(0).set(80 + c, inv_std as f32);
                }
            }
            "t_gather" => {
                let idx = self.buf::<i32>(a.wt);
                (0..count).for_each(|j| o(0).set(j, f(0).get(idx.get(j) as usize)))
            }
            "t_avgpool2" => {
                for e in 0..count {
                    let (c, v) = (e % ca, e / ca);
                    let (k, j, z, nn) = decode(v);
                    let mut acc = 0.0f32;
                    for da in 0..2 {
                        for db in 0..2 {
                            let r = ((nn * 2 * d + 2 * z + da) * 2 * h + 2 * j + db) * 2 * w + 2 * k;
                            acc += f(0).get(r * ca + c) + f(0).get((r + 1) * ca + c);
                        }
                    }
                    o(0).set(e, acc * 0.125);
                }
            }
            "t_channel_mean" => (0..count).for_each(|v| o(0).set(v, cmean(f(0), v, ca))),
            "t_channel_mean_bwd" => (0..count).for_each(|e| o(0).set(e, f(0).get(e / ca) * (1.0 / ca as f32))),
            "t_rl_divide" => (0..count).for_each(|v| o(0).set(v, f(0).get(v) / (cmean(f(1), v, ca) + a.f[0]))),
            "t_rl_divide_bwd" => {
                for v in 0..count {
                    let den = cmean(f(1), v, ca) + a.f[0];
                    let q = f(0).get(v) / den;
                    let g = f(2).get(v);
                    let (da, db) = if a.mode == 0 {
                        (g / den, -q / den * g)
                    } else {
                        (g, -q * q * g)
                    };
                    o(0).set(v, da);
                    (0..ca).for_each(|c| o(1).set(v * ca + c, db * (1.0 / ca as f32)));
                }
            }
            "t_rl_update" => (0..count).for_each(|v| o(0).set(v, cmean(f(1), v, ca) * f(0).get(v))),
            "t_rl_update_bwd" => {
                for v in 0..count {
                    let g = f(2).get(v);
                    o(0).set(v, if a.mode == 0 { cmean(f(1), v, ca) * g } else { g });
                    (0..ca).for_each(|c| o(1).set(v * ca + c, (f(0).get(v) * g) * (1.0 / ca as f32)));
                }
            }
            "t_accumulate" => (0..count).for_each(|e| o(0).set(e, o(0).get(e) + f(0).get(e))),
            "t_reshape" => {
                let src_s = Shape::new(n, ca, a.k0 as usize, a.k1 as usize, a.k2 as usize);
                let x = f(0).to_vec(src_s.len());
                let r = reshape(&x, src_s, Shape::new(n, ca, d, h, w), a.mode);
                assert_eq!(r.len(), count);
                r.iter().enumerate().for_each(|(e, &v)| o(0).set(e, v));
            }
            "t_up2_fwd" => {
                let hs = Shape::new(n, ca, d / 2, h / 2, w / 2);
                let raw = up2_fwd(
                    &f(0).to_vec(hs.len()),
                    hs,
                    &self.buf::<f32>(a.wt).to_vec(ca * cout * 8),
                    cout,
                );
                assert_eq!(raw.len(), count * cout);
                raw.iter()
                    .enumerate()
                    .for_each(|(e, &z)| o(0).set(e, epi(a, z, e % cout, e / cout, f(3))));
            }
            "t_up2_bwd_data" => {
                let hs = Shape::new(n, ca, d, h, w);
                let full = Shape::new(n, cout, 2 * d, 2 * h, 2 * w);
                let r = up2_bwd_data(
                    &f(0).to_vec(full.len()),
                    hs,
                    &self.buf::<f32>(a.wt).to_vec(ca * cout * 8),
                    cout,
                );
                assert_eq!(r.len(), count);
                r.iter().enumerate().for_each(|(e, &v)| o(0).set(e, v));
            }
            "t_up2_wgrad" => {
                let hs = Shape::new(n, ca, d, h, w);
                let full = Shape::new(n, cout, 2 * d, 2 * h, 2 * w);
                let p = up2_wgrad_partials(
                    &f(0).to_vec(hs.len()),
                    hs,
                    &f(3).to_vec(full.len()),
                    cout,
                    a.k0 as usize,
                );
                assert_eq!(p.len() / (ca * cout * 8) * ca * 8, count);
                p.iter().enumerate().for_each(|(i, &v)| part.set(i, v));
            }
            "t_chan_sum" => {
                let x = f(0).to_vec(count);
                let p = block_sums(count, grid.0 as usize, ca, 1, |e, ch, s| {
                    let v = x[e] as f64;
                    s[0] += if a.mode == 1 {
                        (v - stat.get(ch)) * (v - stat.get(ch))
                    } else {
                        v
                    };
                });
                p.iter().enumerate().for_each(|(i, &v)| part.set(i, v));
            }
            "t_epi_bwd1" => {
                let mut dh_all = vec![0.0f32; count];
                let p = block_sums(count, grid.0 as usize, ca, 2, |e, ch, s| {
                    let (g, b, mu, is) = (a.p[0][ch], a.p[1][ch], a.p[2][ch], a.p[3][ch]);
                    let xh = (f(0).get(e) - mu) * is;
                    let dh = if a.mode & 1 != 0 {
                        f(1).get(e) * sigmoid(g * xh + b)
                    } else {
                        f(1).get(e)
                    };
                    dh_all[e] = dh;
                    s[0] += dh as f64;
                    s[1] += (dh * xh) as f64;
                });
                dh_all.iter().enumerate().for_each(|(e, &v)| o(0).set(e, v));
                if a.mode & 2 != 0 {
                    p.iter().enumerate().for_each(|(i, &v)| part.set(i, v));
                }
            }
            "t_epi_bwd2" => {
                for e in 0..count {
                    let c = e % ca;
                    let k = a.p[0][c] * a.p[3][c];
                    let mb = (stat.get(c) / a.dc[0]) as f32;
                    let mg = (stat.get(ca + c) / a.dc[0]) as f32;
                    let xh = (f(0).get(e) - a.p[2][c]) * a.p[3][c];
                    o(0).set(e, k * (o(0).get(e) - mb - xh * mg));
                }
            }
            "t_loss_sums" => {
                let k = if a.mode == 0 { 2 } else { 5 };
                let p = block_sums(count, grid.0 as usize, 1, k, |i, _, s| {
                    let (y, g) = (f(0).get(i) as f64, f(1).get(i) as f64);
                    if a.mode == 0 {
                        s[0] += y;
                        s[1] += g;
                    } else {
                        let (dy, dg) = (y - stat.get(0), g - stat.get(1));
                        let t = f(2).get(i) as f64 - (0.8 * g + 0.2 * f(3).get(i) as f64);
                        s[0] += dy * dy;
                        s[1] += dg * dg;
                        s[2] += dy * dg;
                        s[3] += (y - g) * (y - g);
                        s[4] += t * t;
                    }
                });
                p.iter().enumerate().for_each(|(i, &v)| part.set(i, v));
            }
            "t_loss_finish" => {
                assert_eq!(grid, (1, 1, 1), "t_loss_finish: one block");
                // kernels/loss.cuh, operation by operation (Rust's f64 ops are the
                // intrinsics: rounded, never contracted)
                let nn = a.dc[0];
                let v = stat.to_vec(7);
                let (muy, mug) = ((v[0] * nn) / nn, (v[1] * nn) / nn);
                let (vy, vg, cov) = (v[2] / nn, v[3] / nn, v[4] / nn);
                let aa = 2.0 * muy * mug + 1e-4;
                let bb = 2.0 * cov + 9e-4;
                let cc_ = muy * muy + mug * mug + 1e-4;
                let dd = vy + vg + 9e-4;
                let ssim = aa * bb / (cc_ * dd);
                let k = -ssim / (1.0 + ssim);
                for (i, x) in [nn, v[0], v[1], aa, bb, cc_, dd, k].into_iter().enumerate() {
                    stat.set(7 + i, x);
                }
            }
            "t_loss_grad" => {
                let c = stat.to_vec(8);
                let [nn, my, mg, aa, bb, c_, dd, k] = [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
                for i in 0..count {
                    let (y, g) = (f(0).get(i) as f64, f(1).get(i) as f64);
                    let ds = (2.0 * mg / nn) / aa + (2.0 * (g - mg) / nn) / bb
                        - (2.0 * my / nn) / c_
                        - (2.0 * (y - my) / nn) / dd;
                    o(0).set(i, (2.0 * (y - g) / nn + k * ds) as f32);
                    let t = f(2).get(i) as f64 - (0.8 * g + 0.2 * f(3).get(i) as f64);
                    o(1).set(i, (0.1 * 2.0 * t / nn) as f32);
                }
            }
            "t_reduce_part" => {
                let (j, nb) = (a.k0 as usize, a.k1 as usize);
                assert_eq!(grid.0 as usize, j, "t_reduce_part: one block per value");
                let r = reduce_part(&part.to_vec(nb * j), nb, j, a.dc[0]);
                r.iter().enumerate().for_each(|(i, &v)| stat.set(i, v));
            }
            // kernels/train_adam.cu: Rust's f64 `*`, `+`, `/`, sqrt are the .cu's rounded
            // intrinsics (no contraction), in the same order
            "t_grad_check" => {
                assert_eq!(grid, (1, 1, 1), "t_grad_check: one block");
                if a.mode == 1 && o(0).get(0) != 1.0 {
                    return Ok(()); // sticky: an earlier queued step failed
                }
                let mut all = (0..count).all(|i| part.get(i).is_finite());
                if a.mode == 1 && a.inp[1] != 0 {
                    let loss = self.buf::<f64>(a.inp[1]);
                    all &= (0..7).all(|i| loss.get(i).is_finite());
                }
                o(0).set(0, if all { 1.0 } else { 0.0 });
                if !all && a.mode == 1 {
                    stat.set(2, stat.get(1));
                }
            }
            "t_adam" => {
                if f(0).get(0) != 1.0 {
                    return Ok(());
                }
                let [_, b1, b2, eps, c1, c2, _, _] = a.dc;
                let lr_t = self.buf::<f64>(a.inp[1]).get(0);
                for i in 0..count {
                    let g = part.get(i);
                    let mi = b1 * stat.get(i) + c1 * g;
                    let vi = b2 * stat.get(count + i) + c2 * g * g;
                    stat.set(i, mi);
                    stat.set(count + i, vi);
                    o(0).set(i, (o(0).get(i) as f64 - lr_t * mi / (vi.sqrt() + eps)) as f32);
                }
            }
            "t_running_stats" => {
                if f(0).get(0) != 1.0 {
                    return Ok(());
                }
                for i in 0..count {
                    o(0).set(i, (a.dc[0] * o(0).get(i) as f64 + a.dc[1] * part.get(i)) as f32);
                }
            }
            other => panic!("no emulation of kernel {other}"),
        }
        Ok(())
    }
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

    use crate::backend::cpu::CpuBackend;
    use crate::backend::cuda::CudaTrainBackend;
    use crate::backend::{Addend, Backend, BnTrainState, ChannelStats, Epilogue, GradMode, TrainPrecision};
    use crate::model::{Model, ModelConfig, Params, Variant};
    use crate::net::{BnMode, Rln};
    use crate::train::trainer::{train_step_on, TrainConfig, TrainState};
    use std::sync::Arc;

    const CPU: CpuBackend<f32> = CpuBackend::<f32>::new_const();

    fn emulated() -> CudaTrainBackend {
        CudaTrainBackend::on_exec(Arc::new(EmuExec::default()), true)
    }

    fn check(what: &str, got: &Tensor<f32>, want: &Tensor<f32>, tol: f64) {
        assert_eq!(got.shape, want.shape, "{what}: shape");
        assert!(
            got.all_finite(),
            "{what}: non-finite values (an element was not written)"
        );
        let e = rel_l2(&got.data, &want.data);
        assert!(e <= tol, "{what}: rel L2 {e:e} > {tol:e}");
    }

    fn check_v(what: &str, got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let e = rel_l2(got, want);
        assert!(e <= tol, "{what}: rel L2 {e:e} > {tol:e}");
    }

    /// Every op of the training backend through the emulated device (the host side of
    /// train.rs: parameter blocks, grids, buffers, reductions) against the CPU backend.
    #[test]
    fn emulated_backend_ops_match_the_cpu() {
        let b = emulated();
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let s = Shape::new(2, 1, 5, 6, 9);
        let cases: [(&[usize], usize); 6] = [
            (&[1], 4),
            (&[4, 4], 4),
            (&[8, 1, 1], 8),
            (&[8], 1),
            (&[3], 2),
            (&[2, 3], 5),
        ];
        for (cs, c_out) in cases {
            let ins: Vec<Tensor<f32>> = cs.iter().map(|&c| random(s.with_c(c), &mut rng)).collect();
            let refs: Vec<&Tensor<f32>> = ins.iter().collect();
            let dins: Vec<_> = ins.iter().map(|t| b.from_host(t).unwrap()).collect();
            let drefs: Vec<_> = dins.iter().collect();
            let cin: usize = cs.iter().sum();
            let w: Vec<f32> = (0..cin * c_out * 27).map(|_| rng.random_range(-0.3..0.3)).collect();
            let sc: Vec<f32> = (0..c_out).map(|_| rng.random_range(0.5..1.5)).collect();
            let sh: Vec<f32> = (0..c_out).map(|_| rng.random_range(-0.5..0.5)).collect();
            let aux = random(s.with_c(1), &mut rng);
            let auxd = b.from_host(&aux).unwrap();
            let want = CPU
                .conv3(
                    &refs,
                    &w,
                    c_out,
                    &Epilogue {
                        scale: &sc,
                        shift: &sh,
                        softplus: true,
                        addend: Addend::SoftplusOf(&aux),
                    },
                )
                .unwrap();
            let got = b
                .conv3(
                    &drefs,
                    &w,
                    c_out,
                    &Epilogue {
                        scale: &sc,
                        shift: &sh,
                        softplus: true,
                        addend: Addend::SoftplusOf(&auxd),
                    },
                )
                .unwrap();
            check(&format!("conv3 {cs:?}→{c_out}"), &b.to_host(&got).unwrap(), &want, 1e-5);
            let dz = random(s.with_c(c_out), &mut rng);
            let dzd = b.from_host(&dz).unwrap();
            check_v(
                &format!("conv3 wgrad {cs:?}"),
                &b.conv3_backward_weight(&drefs, &dzd).unwrap(),
                &CPU.conv3_backward_weight(&refs, &dz).unwrap(),
                1e-5,
            );
            let needed = vec![true; cs.len()];
            let want = CPU.conv3_backward_data(&dz, &w, cs, &needed).unwrap();
            for (g, wt) in b.conv3_backward_data(&dzd, &w, cs, &needed).unwrap().iter().zip(&want) {
                check(
                    &format!("conv3 dgrad {cs:?}"),
                    &b.to_host(g.as_ref().unwrap()).unwrap(),
                    wt.as_ref().unwrap(),
                    1e-5,
                );
            }
        }
        let x = random(Shape::new(2, 8, 3, 2, 4), &mut rng);
        let w: Vec<f32> = (0..8 * 4 * 8).map(|_| rng.random_range(-0.5..0.5)).collect();
        let (sc, sh) = ([1.1f32, 0.9, 1.0, 1.2], [0.1f32, 0.0, -0.1, 0.2]);
        let want = CPU
            .up2(
                &x,
                &w,
                4,
                &Epilogue {
                    scale: &sc,
                    shift: &sh,
                    softplus: true,
                    addend: Addend::None,
                },
            )
            .unwrap();
        let xd = b.from_host(&x).unwrap();
        check(
            "up2",
            &b.to_host(
                &b.up2(
                    &xd,
                    &w,
                    4,
                    &Epilogue {
                        scale: &sc,
                        shift: &sh,
                        softplus: true,
                        addend: Addend::Const(1.0),
                    },
                )
                .unwrap(),
            )
            .unwrap(),
            &CPU.epilogue(
                &want,
                &Epilogue {
                    scale: &[],
                    shift: &[],
                    softplus: false,
                    addend: Addend::Const(1.0),
                },
            )
            .unwrap(),
            1e-5,
        );
        let dz = random(want.shape, &mut rng);
        let dzd = b.from_host(&dz).unwrap();
        check(
            "up2 dgrad",
            &b.to_host(&b.up2_backward_data(&dzd, &w, 8).unwrap()).unwrap(),
            &CPU.up2_backward_data(&dz, &w, 8).unwrap(),
            1e-5,
        );
        check_v(
            "up2 wgrad",
            &b.up2_backward_weight(&xd, &dzd).unwrap(),
            &CPU.up2_backward_weight(&x, &dz).unwrap(),
            1e-5,
        );
        for c in [1usize, 4, 8] {
            let z = random(s.with_c(c), &mut rng);
            let zd = b.from_host(&z).unwrap();
            let st = CPU.batch_stats(&z).unwrap();
            let gs = b.batch_stats(&zd).unwrap();
            check_v("batch mean", &gs.mean, &st.mean, 1e-12);
            check_v("batch var", &gs.var, &st.var, 1e-12);
            let dy = random(s.with_c(c), &mut rng);
            let dyd = b.from_host(&dy).unwrap();
            let bn = BnTrainState {
                gamma: (0..c).map(|_| rng.random_range(0.5f32..1.5)).collect(),
                beta: (0..c).map(|_| rng.random_range(-0.5f32..0.5)).collect(),
                mean: st.mean.iter().map(|&v| v as f32).collect(),
                inv_std: st.var.iter().map(|&v| (1.0 / (v + 1e-3).sqrt()) as f32).collect(),
                resident: 0,
            };
            for bnr in [Some(&bn), None] {
                let (wz, wg, wb) = CPU.epilogue_backward(&z, &dy, true, bnr).unwrap();
                let (gz, gg, gb) = b.epilogue_backward(&zd, &dyd, true, bnr).unwrap();
                check("epilogue_backward dz", &b.to_host(&gz).unwrap(), &wz, 1e-5);
                check_v("dgamma", &gg, &wg, 1e-5);
                check_v("dbeta", &gb, &wb, 1e-5);
            }
            let a = random(s.with_c(1), &mut rng);
            let a = Tensor {
                shape: a.shape,
                data: a.data.iter().map(|v| v.abs() + 0.05).collect(),
            };
            let t = Tensor {
                shape: z.shape,
                data: z.data.iter().map(|v| v.abs()).collect(),
            };
            let (ad, td) = (b.from_host(&a).unwrap(), b.from_host(&t).unwrap());
            check(
                "rl_divide",
                &b.to_host(&b.rl_divide(&ad, &td, 1e-3).unwrap()).unwrap(),
                &CPU.rl_divide(&a, &t, 1e-3).unwrap(),
                1e-6,
            );
            check(
                "rl_update",
                &b.to_host(&b.rl_update(&ad, &td).unwrap()).unwrap(),
                &CPU.rl_update(&a, &t).unwrap(),
                1e-6,
            );
            let g1 = random(s.with_c(1), &mut rng);
            let g1d = b.from_host(&g1).unwrap();
            for mode in [GradMode::Paper, GradMode::Exact] {
                let (wa, wt) = CPU.rl_divide_backward(&a, &t, 1e-3, &g1, mode).unwrap();
                let (ga, gt) = b.rl_divide_backward(&ad, &td, 1e-3, &g1d, mode).unwrap();
                check("rl_divide_backward da", &b.to_host(&ga).unwrap(), &wa, 1e-6);
                check("rl_divide_backward dfp", &b.to_host(&gt).unwrap(), &wt, 1e-6);
                let (wa, wt) = CPU.rl_update_backward(&a, &t, &g1, mode).unwrap();
                let (ga, gt) = b.rl_update_backward(&ad, &td, &g1d, mode).unwrap();
                check("rl_update_backward da", &b.to_host(&ga).unwrap(), &wa, 1e-6);
                check("rl_update_backward dbp", &b.to_host(&gt).unwrap(), &wt, 1e-6);
            }
            check(
                "channel_mean",
                &b.to_host(&b.channel_mean(&zd).unwrap()).unwrap(),
                &CPU.channel_mean(&z).unwrap(),
                1e-6,
            );
            check(
                "channel_mean_backward",
                &b.to_host(&b.channel_mean_backward(&g1d, c).unwrap()).unwrap(),
                &CPU.channel_mean_backward(&g1, c).unwrap(),
                1e-6,
            );
            let padded = CPU.pad_even(&z).unwrap();
            check("pad_even", &b.to_host(&b.pad_even(&zd).unwrap()).unwrap(), &padded, 0.0);
            check(
                "avgpool2",
                &b.to_host(&b.avgpool2(&b.pad_even(&zd).unwrap()).unwrap()).unwrap(),
                &CPU.avgpool2(&padded).unwrap(),
                1e-6,
            );
            check(
                "crop",
                &b.to_host(&b.crop(&b.from_host(&padded).unwrap(), z.shape).unwrap())
                    .unwrap(),
                &z,
                0.0,
            );
            check(
                "uncrop",
                &b.to_host(&b.uncrop_zeros(&zd, padded.shape).unwrap()).unwrap(),
                &CPU.uncrop_zeros(&z, padded.shape).unwrap(),
                0.0,
            );
            let mut acc = b.from_host(&z).unwrap();
            b.accumulate(&mut acc, &zd).unwrap();
            check(
                "accumulate",
                &b.to_host(&acc).unwrap(),
                &Tensor {
                    shape: z.shape,
                    data: z.data.iter().map(|v| v + v).collect(),
                },
                0.0,
            );
        }
        let one = s.with_c(1);
        let r = |rng: &mut ChaCha8Rng| {
            Tensor::from_vec(one, (0..one.len()).map(|_| rng.random_range(0.0f32..1.0)).collect()).unwrap()
        };
        let (y, e, x, g) = (r(&mut rng), r(&mut rng), r(&mut rng), r(&mut rng));
        let (wt, wdy, wde) = CPU.loss(&y, &e, &x, &g).unwrap();
        let (gt, gdy, gde) = b
            .loss(
                &b.from_host(&y).unwrap(),
                &b.from_host(&e).unwrap(),
                &b.from_host(&x).unwrap(),
                &b.from_host(&g).unwrap(),
            )
            .unwrap();
        check_v(
            "loss",
            &[gt.loss, gt.mse, gt.mse_aux, gt.ssim],
            &[wt.loss, wt.mse, wt.mse_aux, wt.ssim],
            1e-12,
        );
        check("dL/dy", &b.to_host(&gdy).unwrap(), &wdy, 1e-6);
        check("dL/dE1r", &b.to_host(&gde).unwrap(), &wde, 1e-6);
        let (live, _) = b.mem_bytes();
        assert!(live > 0);
    }

    /// Per layer: the relative L2 distance of all its gradients (weight, γ, β together)
    /// to the f64 CPU gradients, and the CPU f32 gradients' distance (the rounding level).
    /// Per tensor is no criterion: the γ gradient of a one-channel batch norm (dv, E) is a
    /// single sum with heavy cancellation (seen: 2e-7 next to ∂β = 1e-2, so f32 rounding
    /// alone moves it by several percent).
    fn layer_errors(got: &Params<f64>, want32: &Params<f64>, want64: &Params<f64>) -> Vec<(usize, f64, f64)> {
        let cat = |p: &Params<f64>, l: usize| -> Vec<f64> {
            let x = &p.layers[l];
            x.weight.iter().chain(&x.gamma).chain(&x.beta).copied().collect()
        };
        (0..want64.layers.len())
            .map(|l| {
                (
                    l,
                    rel_l2(&cat(got, l), &cat(want64, l)),
                    rel_l2(&cat(want32, l), &cat(want64, l)),
                )
            })
            .collect()
    }

    fn worst_param_err(got: &Params<f64>, want: &Params<f64>) -> f64 {
        want.ids()
            .into_iter()
            .map(|(l, k)| rel_l2(got.tensor(l, k), want.tensor(l, k)))
            .fold(0.0, f64::max)
    }

    /// The whole network (forward with batch statistics, loss, backward in both modes)
    /// and two training steps on the emulated device, against the CPU backend.
    #[test]
    fn emulated_backend_trains_like_the_cpu() {
        let b = emulated();
        for (variant, shape) in [
            (Variant::Single, Shape::new(2, 1, 7, 8, 10)),
            (Variant::DualConcat, Shape::new(1, 2, 6, 6, 8)),
        ] {
            let model = Model::<f32>::init(
                ModelConfig {
                    variant,
                    ..ModelConfig::default()
                },
                3,
            );
            let mut rng = ChaCha8Rng::seed_from_u64(4);
            let x = Tensor::from_vec(shape, (0..shape.len()).map(|_| rng.random_range(0.0f32..1.0)).collect()).unwrap();
            let g = Tensor::from_vec(
                shape.with_c(1),
                (0..shape.with_c(1).len())
                    .map(|_| rng.random_range(0.0f32..1.0))
                    .collect(),
            )
            .unwrap();
            let x1 = CPU.channel_mean(&x).unwrap();
            for mode in [GradMode::Paper, GradMode::Exact] {
                let net = Rln::new(&CPU, &model);
                let f = net.forward(&x, BnMode::Batch, true).unwrap();
                let (tc, dy, de) = CPU.loss(&f.prediction, &f.e1_raw, &x1, &g).unwrap();
                let want = net.backward(&f, &dy, &de, mode).unwrap();
                let netg = Rln::new(&b, &model);
                let xd = b.from_host(&x).unwrap();
                let fg = netg.forward(&xd, BnMode::Batch, true).unwrap();
                let (tg, dyg, deg) = b
                    .loss(
                        &fg.prediction,
                        &fg.e1_raw,
                        &b.channel_mean(&xd).unwrap(),
                        &b.from_host(&g).unwrap(),
                    )
                    .unwrap();
                check("prediction", &b.to_host(&fg.prediction).unwrap(), &f.prediction, 1e-5);
                assert!((tg.loss - tc.loss).abs() < 1e-5 * tc.loss.abs());
                let got = netg.backward(&fg, &dyg, &deg, mode).unwrap();
                let m64: Model<f64> = model.cast();
                let b64 = CpuBackend::<f64>::new();
                let n64 = Rln::new(&b64, &m64);
                let f6 = n64.forward(&x.cast(), BnMode::Batch, true).unwrap();
                let (_, d6, e6) = b64.loss(&f6.prediction, &f6.e1_raw, &x1.cast(), &g.cast()).unwrap();
                let w64 = n64.backward(&f6, &d6, &e6, mode).unwrap();
                for (l, e, level) in layer_errors(&got, &want, &w64) {
                    assert!(
                        e <= (2.0 * level).max(1e-4),
                        "{variant:?} {mode:?} layer {l}: {e:e} from f64 (CPU f32: {level:e})"
                    );
                }
                println!(
                    "{variant:?} {mode:?}: worst gradient tensor vs CPU f32 {:.2e}",
                    worst_param_err(&got, &want)
                );
                drop((fg, dyg, deg, xd));
                // inference mode (running statistics, folded epilogues in the conv)
                let fi = netg.forward(&b.from_host(&x).unwrap(), BnMode::Running, false).unwrap();
                check(
                    "inference",
                    &b.to_host(&fi.prediction).unwrap(),
                    &net.forward(&x, BnMode::Running, false).unwrap().prediction,
                    1e-5,
                );
            }
        }
        assert_eq!(b.mem_bytes().0, 0, "every device tensor was freed");
        let cfg = TrainConfig::default();
        let model = Model::<f32>::init(ModelConfig::default(), 5);
        let (mut sc, mut sg) = (TrainState::new(model.clone(), &cfg), TrainState::new(model, &cfg));
        let shape = Shape::new(2, 1, 8, 8, 12);
        for step in 0..2 {
            let mut rng = ChaCha8Rng::seed_from_u64(step);
            let x = Tensor::from_vec(shape, (0..shape.len()).map(|_| rng.random_range(0.0f32..1.0)).collect()).unwrap();
            let g = Tensor {
                shape,
                data: x.data.iter().map(|v| v * v).collect(),
            };
            let tc = train_step_on(&CPU, &mut sc, &cfg, &x, &g).unwrap();
            let tg = train_step_on(&b, &mut sg, &cfg, &x, &g).unwrap();
            assert!(
                (tg.loss - tc.loss).abs() < 1e-5 * tc.loss.abs(),
                "step {step}: {} vs {}",
                tg.loss,
                tc.loss
            );
            let e = worst_param_err(&sg.model.params.cast(), &sc.model.params.cast());
            assert!(e < 1e-4, "weights after step {step}: {e:e}");
        }
    }

    /// What one training step asks of the device: launches, synchronizations (every
    /// device-to-host copy waits), uploads. Printed for kernels/NOTES.md; bounded so a
    /// change that adds round trips shows up. A queued step of the resident loop copies
    /// nothing to the host: weights, batch norm, loss and optimizer stay on the device
    /// (uploads: the batch, lr_t); the poll every `POLL_EVERY` steps reads the state, the
    /// status and the loss (3 copies).
    #[test]
    fn one_training_step_launches_and_synchronizations() {
        use crate::train::trainer::{poll_steps, train_step_queued};
        use std::sync::atomic::Ordering::Relaxed;
        let exec = Arc::new(EmuExec::default());
        let b = CudaTrainBackend::on_exec(exec.clone(), false);
        let cfg = TrainConfig::default();
        let mut st = TrainState::new(Model::<f32>::init(ModelConfig::default(), 1), &cfg);
        let shape = Shape::new(1, 1, 8, 8, 8);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x = Tensor::from_vec(shape, (0..shape.len()).map(|_| rng.random_range(0.0f32..1.0)).collect()).unwrap();
        let mut opt = b.opt_new(&st.model, &st.adam).unwrap();
        let counts = || {
            (
                exec.launches.lock().unwrap().len(),
                exec.dtoh_count.load(Relaxed),
                exec.htod_count.load(Relaxed),
            )
        };
        let mut per_step = vec![];
        for _ in 0..2 {
            let before = counts();
            assert!(train_step_queued(&b, &mut opt, &mut st, &cfg, &x, &x)
                .unwrap()
                .is_none());
            let after = counts();
            per_step.push((after.0 - before.0, after.1 - before.1, after.2 - before.2));
        }
        let before = counts();
        let terms = poll_steps(&b, &mut opt, &mut st).unwrap().expect("the loss");
        assert!(terms.loss.is_finite());
        let poll = (counts().1 - before.1, counts().2 - before.2);
        let launches = exec.launches.lock().unwrap().clone();
        let mut by: std::collections::BTreeMap<String, usize> = Default::default();
        for l in &launches[launches.len() - per_step[1].0..] {
            *by.entry(l.clone()).or_default() += 1;
        }
        println!(
            "first step {:?}, second step {:?} (launches, device-to-host copies, uploads); poll {poll:?} (copies, uploads)",
            per_step[0], per_step[1]
        );
        println!("{by:?}");
        assert_eq!(per_step[1].1, 0, "a queued step copies nothing to the host");
        assert_eq!(per_step[0].1, 0);
        // the batch (x, g) and lr_t with the step index; the first step also makes the
        // gather tables of the packed conv weights (one per layout, then kept)
        assert_eq!(per_step[1].2, 3, "uploads of a step: x, g, lr_t");
        // the 12 batch norms whose input a conv produced take their statistics from its
        // epilogue (one t_reduce_part each); the 5 others (after up2, or of a concatenation)
        // keep the two t_chan_sum passes and their two reductions
        assert_eq!(by["t_chan_sum"], 10, "{by:?}");
        assert_eq!(by["t_bn_fold"], 17, "{by:?}");
        assert!(per_step[0].2 > 3);
        assert_eq!(poll.0, 3, "the poll: state, status record, loss");
        assert_eq!(st.step, 2);
        assert_eq!(
            per_step[1].0, 247,
            "launches of a step (283 with the two-pass statistics)"
        );
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

    /// The batch statistics a forward conv's epilogue sums (EPI_STATS: per-thread f64 Σy,
    /// Σy², block reduction, t_reduce_part, then t_bn_fold's E[y²] − mean²) against the
    /// separate two-pass reduction (t_chan_sum twice) and a plain f64 oracle, for both
    /// kernels' thread mappings, on volumes with partial tiles and data whose mean is 3×
    /// its spread (mean²/var = 27: the cancellation the one-pass variance pays). Not bit
    /// equal to the two passes (another summation order, and Σy² − m·mean² is not
    /// Σ(y − mean)²); bound: mean 1e-13 relative, variance 1e-11 relative (measured
    /// ≤ 1e-15 and ≤ 1e-14, printed; f32 rounding of scale/shift is 6e-8).
    #[test]
    fn conv_epilogue_statistics_equal_the_two_pass_reduction() {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let mut worst = (0.0f64, 0.0f64);
        for (map, c, s) in [
            (StatsMapping::Fp32, 1, Shape::new(2, 1, 5, 11, 37)),
            (StatsMapping::Fp32, 4, Shape::new(1, 4, 9, 9, 33)),
            (StatsMapping::Fp32, 8, Shape::new(2, 8, 4, 8, 32)),
            (StatsMapping::Mma, 4, Shape::new(2, 4, 9, 11, 19)),
            (StatsMapping::Mma, 8, Shape::new(1, 8, 8, 8, 16)),
            (StatsMapping::Mma, 8, Shape::new(2, 8, 10, 5, 17)),
        ] {
            let y: Vec<f32> = (0..s.len()).map(|_| 3.0 + rng.random_range(-1.0f32..1.0)).collect();
            let part = epi_stats_partials(&y, s, c, map);
            assert!(part.iter().all(|v| v.is_finite()), "{map:?}: every block row written");
            let blocks = part.len() / (2 * c);
            let m = (s.n * s.spatial()) as f64;
            let r = reduce_part(&part, blocks, 2 * c, 1.0 / m);
            let mean2 = chan_sum(&y, c, None, m);
            let var2 = chan_sum(&y, c, Some(&mean2), m);
            for ch in 0..c {
                let mean = r[ch];
                let var = (r[c + ch] - mean * mean).max(0.0);
                // oracle: plain f64 sums in voxel order, two passes
                let vals: Vec<f64> = y.iter().skip(ch).step_by(c).map(|&v| v as f64).collect();
                let mo = vals.iter().sum::<f64>() / m;
                let vo = vals.iter().map(|v| (v - mo) * (v - mo)).sum::<f64>() / m;
                let (dm, dv) = (
                    ((mean - mean2[ch]) / mean2[ch]).abs(),
                    ((var - var2[ch]) / var2[ch]).abs(),
                );
                worst = (worst.0.max(dm), worst.1.max(dv));
                assert!(
                    dm <= 1e-13,
                    "{map:?} C={c} {s} channel {ch}: mean {mean} vs two-pass {}",
                    mean2[ch]
                );
                assert!(
                    dv <= 1e-11,
                    "{map:?} C={c} {s} channel {ch}: variance {var} vs two-pass {}",
                    var2[ch]
                );
                assert!(
                    ((mean - mo) / mo).abs() <= 1e-13 && ((var - vo) / vo).abs() <= 1e-11,
                    "oracle"
                );
            }
        }
        println!(
            "epilogue vs two-pass statistics: worst relative difference mean {:.1e}, variance {:.1e}",
            worst.0, worst.1
        );
    }

    /// The resident training step with the batch statistics in the conv epilogues tracks
    /// the two-pass path (set_fused_bn_stats(false)) over 8 steps, FP32 and mixed: the
    /// statistics differ by ~1e-15 relative, which flips an f32 rounding of a BN scale or
    /// shift now and then; the loss stays within 1e-5 relative of the two-pass run's and
    /// every weight within 1e-5 of it (measured: printed). The fused run launches no
    /// t_chan_sum for the 12 batch norms with a conv producer (10 remain: the 5 without).
    #[test]
    fn fused_batch_statistics_track_the_two_pass_training_run() {
        use crate::train::trainer::train_step_resident;
        let cfg = TrainConfig::default();
        let model = Model::<f32>::init(ModelConfig::default(), 23);
        let shape = Shape::new(2, 1, 8, 8, 16);
        let batches: Vec<(Tensor<f32>, Tensor<f32>)> = (0..3)
            .map(|i| {
                let mut rng = ChaCha8Rng::seed_from_u64(70 + i);
                let x =
                    Tensor::from_vec(shape, (0..shape.len()).map(|_| rng.random_range(0.0f32..1.0)).collect()).unwrap();
                let g = Tensor {
                    shape,
                    data: x.data.iter().map(|v| v * v).collect(),
                };
                (x, g)
            })
            .collect();
        for precision in [TrainPrecision::Fp32, TrainPrecision::Mixed] {
            let mut runs = vec![];
            for fused in [false, true] {
                let exec = Arc::new(EmuExec::default());
                let mut b = CudaTrainBackend::on_exec(exec.clone(), true);
                b.set_precision(precision);
                b.set_fused_bn_stats(fused);
                let mut st = TrainState::new(model.clone(), &cfg);
                let mut opt = b.opt_new(&st.model, &st.adam).unwrap();
                let mut losses = vec![];
                for step in 0..8 {
                    let (x, g) = &batches[step % batches.len()];
                    let before = exec.launches.lock().unwrap().len();
                    let t = train_step_resident(&b, &mut opt, &mut st, &cfg, x, g).unwrap();
                    let l = exec.launches.lock().unwrap();
                    let chan_sums = l[before..].iter().filter(|n| *n == "t_chan_sum").count();
                    assert_eq!(chan_sums, if fused { 10 } else { 34 }, "{precision} fused {fused}");
                    losses.push(t.loss);
                }
                runs.push((losses, st.model));
            }
            let ((l0, m0), (l1, m1)) = (&runs[0], &runs[1]);
            let worst_loss = l0
                .iter()
                .zip(l1)
                .map(|(a, b)| ((a - b) / a).abs())
                .fold(0.0f64, f64::max);
            let mut worst_w = 0.0f64;
            for (a, b) in m0.params.layers.iter().zip(&m1.params.layers) {
                for (x, y) in a.weight.iter().zip(&b.weight) {
                    worst_w = worst_w.max((x - y).abs() as f64);
                }
            }
            println!("{precision}: fused vs two-pass: worst loss relative difference {worst_loss:.1e}, worst weight difference {worst_w:.1e}");
            assert!(worst_loss <= 1e-5, "{precision}: loss {l0:?} vs {l1:?}");
            assert!(worst_w <= 1e-5, "{precision}: weights differ by {worst_w:e}");
        }
    }

    /// Thin and odd volumes through the emulated device's whole forward pass (inference
    /// mode): depths 1–4 pool to one or two half-resolution planes; H and W odd and even.
    #[test]
    fn emulated_forward_on_thin_volumes_matches_the_cpu() {
        let b = emulated();
        let model = Model::<f32>::init(ModelConfig::default(), 5);
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        for d in 1..=4usize {
            for (h, w) in [(3usize, 5usize), (6, 2)] {
                let shape = Shape::new(1, 1, d, h, w);
                let x =
                    Tensor::from_vec(shape, (0..shape.len()).map(|_| rng.random_range(0.0f32..1.0)).collect()).unwrap();
                let want = Rln::new(&CPU, &model)
                    .forward(&x, BnMode::Running, false)
                    .unwrap()
                    .prediction;
                let got = Rln::new(&b, &model)
                    .forward(&b.from_host(&x).unwrap(), BnMode::Running, false)
                    .unwrap();
                check(&format!("{shape}"), &b.to_host(&got.prediction).unwrap(), &want, 1e-5);
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

    /// A device that runs out of memory mid-step: the trainer returns the typed
    /// out-of-memory error (mapped from CUDA_ERROR_OUT_OF_MEMORY by the device layer) with
    /// the settings to lower, and leaves the state as it was; with enough memory the same
    /// step succeeds.
    #[test]
    fn emulated_device_out_of_memory_is_a_typed_training_error() {
        let cfg = TrainConfig::default();
        let model = Model::<f32>::init(ModelConfig::default(), 3);
        let shape = Shape::new(2, 1, 8, 8, 8);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let x = Tensor::from_vec(shape, (0..shape.len()).map(|_| rng.random_range(0.0f32..1.0)).collect()).unwrap();
        // room for the input and a few activations, not for a whole forward pass
        let small = Arc::new(EmuExec {
            memory_limit: Some(64 * shape.len() * 4),
            ..EmuExec::default()
        });
        let b = CudaTrainBackend::on_exec(small, false);
        let mut st = TrainState::new(model.clone(), &cfg);
        let e = train_step_on(&b, &mut st, &cfg, &x, &x).expect_err("the step must not fit");
        assert!(matches!(e, crate::Error::OutOfMemory(_)), "{e:?}");
        let msg = e.to_string();
        println!("{msg}");
        for want in [
            "CUDA_ERROR_OUT_OF_MEMORY",
            "--batch, now 2",
            "--crop, now 8×8×8",
            "training step 0",
        ] {
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
        assert_eq!(st.step, 0);
        assert_eq!(st.model, model, "a failed step leaves the model untouched");
        let b = CudaTrainBackend::on_exec(Arc::new(EmuExec::default()), false);
        train_step_on(&b, &mut st, &cfg, &x, &x).expect("without the limit the step runs");
        assert_eq!(st.step, 1);
    }

    // ---------------------------------------------------------------- resident state

    /// A model, Adam state (non-zero moments, step 7) and gradients with values of every
    /// scale, for the optimizer tests.
    fn random_opt_state(seed: u64) -> (Model<f32>, crate::backend::optim::Adam, Params<f64>) {
        use crate::backend::optim::{Adam, LrSchedule};
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut model = Model::<f32>::init(ModelConfig::default(), seed);
        for l in 0..model.running.mean.len() {
            for c in 0..model.running.mean[l].len() {
                model.running.mean[l][c] = rng.random_range(-2.0f32..2.0);
                model.running.var[l][c] = rng.random_range(0.01f32..3.0);
            }
        }
        let mut adam = Adam::new(Variant::Single, LrSchedule::default());
        adam.step = 7;
        adam.m.zip_mut(&Params::zeros(Variant::Single), |m, _| {
            *m = rng.random_range(-1e-2..1e-2)
        });
        adam.v
            .zip_mut(&Params::zeros(Variant::Single), |v, _| *v = rng.random_range(0.0..1e-3));
        let mut g = Params::<f64>::zeros(Variant::Single);
        g.zip_mut(&Params::zeros(Variant::Single), |x, _| {
            *x = rng.random_range(-1.0..1.0) * 10f64.powi(rng.random_range(-6..2))
        });
        (model, adam, g)
    }

    fn random_stats(seed: u64, model: &Model<f32>) -> Vec<Option<ChannelStats>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        model
            .running
            .mean
            .iter()
            .map(|m| {
                (!m.is_empty()).then(|| ChannelStats {
                    mean: m.iter().map(|_| rng.random_range(-1.0..1.0)).collect(),
                    var: m.iter().map(|_| rng.random_range(0.0..2.0)).collect(),
                })
            })
            .collect()
    }

    /// Adam (t_adam) and the running statistics (t_running_stats) on the emulated device
    /// equal the host's `Adam::update` + `update_running_stats` bit for bit over three
    /// steps: the moments stay f64 and every operation is a rounded f64 operation in the
    /// host's order, so the tolerance is zero (the only f32 rounding, of the new weight
    /// and statistic, is the host's too). A non-finite gradient changes nothing.
    #[test]
    fn emulated_adam_and_running_statistics_equal_the_host_bit_for_bit() {
        use crate::backend::optim::update_running_stats;
        use crate::backend::GradSink;
        let b = emulated();
        let (model, adam, _) = random_opt_state(3);
        let (mut host_model, mut host_adam) = (model.clone(), adam.clone());
        let mut opt = b.opt_new(&model, &adam).unwrap();
        let mut dev_model = model.clone();
        for step in 0..3u64 {
            let (_, _, g) = random_opt_state(10 + step);
            let stats = random_stats(20 + step, &model);
            host_adam.update(&mut host_model.params, &g);
            update_running_stats(&mut host_model, &stats);
            let mut dg = b.grads_new(Variant::Single).unwrap();
            for (l, k) in g.ids() {
                dg.put(l, k, g.tensor(l, k).clone()).unwrap();
            }
            assert!(b.opt_step(&mut opt, &dg, &stats, &mut dev_model).unwrap());
            assert_eq!(dev_model, host_model, "the host mirror after step {step}");
            let mut downloaded = model.clone();
            let dev_adam = b.opt_download(&opt, &mut downloaded).unwrap();
            assert_eq!(
                downloaded, host_model,
                "the device's weights and statistics after step {step}"
            );
            assert_eq!(
                dev_adam, host_adam,
                "the device's moments and step counter after step {step}"
            );
        }
        assert_ne!(host_model, model, "the steps changed the weights");
        // a NaN gradient: nothing moves, on the device or in the mirror
        let (_, _, mut g) = random_opt_state(30);
        g.layers[5].gamma[1] = f64::NAN;
        let mut dg = b.grads_new(Variant::Single).unwrap();
        for (l, k) in g.ids() {
            dg.put(l, k, g.tensor(l, k).clone()).unwrap();
        }
        let before = dev_model.clone();
        assert!(!b
            .opt_step(&mut opt, &dg, &random_stats(31, &model), &mut dev_model)
            .unwrap());
        assert_eq!(dev_model, before);
        let mut downloaded = model.clone();
        assert_eq!(b.opt_download(&opt, &mut downloaded).unwrap(), host_adam);
        assert_eq!(downloaded, before);
    }

    /// The optimizer's device part captured once as a graph and replayed for three steps
    /// (gradients, batch statistics and lr_t written into their fixed device buffers before
    /// each replay) equals the host's Adam and running statistics bit for bit, as the
    /// uncaptured step does (the test above): the graph reads lr_t from device memory, not
    /// from the arguments frozen at capture (with lr_t frozen, step 2 would differ).
    #[test]
    fn captured_optimizer_step_replayed_equals_the_host_bit_for_bit() {
        use crate::backend::optim::update_running_stats;
        use crate::backend::GradSink;
        let exec = Arc::new(EmuExec::default());
        let b = CudaTrainBackend::on_exec(exec.clone(), true);
        let rt = b.runtime().clone();
        let (model, adam, _) = random_opt_state(3);
        let (mut host_model, mut host_adam) = (model.clone(), adam.clone());
        let mut opt = b.opt_new(&model, &adam).unwrap();
        let mut dg = b.grads_new(Variant::Single).unwrap();
        let batch = rt.alloc(opt.running_len() * 8).unwrap();
        rt.begin_capture().unwrap();
        b.resident_opt_launch(&opt, &dg, batch.ptr()).unwrap();
        let graph = rt.end_capture().unwrap();
        assert_eq!(graph.launches(), 3, "t_grad_check, t_adam, t_running_stats");
        assert!(exec.launches.lock().unwrap().is_empty(), "a capture runs nothing");
        let mut dev_model = model.clone();
        for step in 0..3u64 {
            let (_, _, g) = random_opt_state(10 + step);
            let stats = random_stats(20 + step, &model);
            host_adam.update(&mut host_model.params, &g);
            update_running_stats(&mut host_model, &stats);
            for (l, k) in g.ids() {
                dg.put(l, k, g.tensor(l, k).clone()).unwrap();
            }
            b.resident_put_batch_stats(&opt, &stats, &batch).unwrap();
            b.resident_opt_prepare(&opt).unwrap();
            graph.replay().unwrap();
            assert!(b.resident_opt_finish(&mut opt, &mut dev_model).unwrap());
            assert_eq!(dev_model, host_model, "weights and statistics after replay {step}");
        }
        assert_eq!(exec.replays.load(std::sync::atomic::Ordering::Relaxed), 3);
        let mut downloaded = model.clone();
        assert_eq!(b.opt_download(&opt, &mut downloaded).unwrap(), host_adam);
    }

    /// Work with allocations made and freed inside the capture (pooling into a temporary,
    /// accumulated into a buffer allocated before) replayed three times equals the same
    /// work run three times, bit for bit; the temporary keeps its address across replays.
    /// A capture that copies to the host, waits for the device, uploads, or leaves an
    /// allocation of its own alive is refused with an error that says why, and ends.
    #[test]
    fn captures_replay_exactly_and_refuse_host_round_trips() {
        let exec = Arc::new(EmuExec::default());
        let b = CudaTrainBackend::on_exec(exec.clone(), true);
        let rt = b.runtime().clone();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let x = b.from_host(&random(Shape::new(2, 4, 4, 6, 8), &mut rng)).unwrap();
        let acc0 = random(Shape::new(2, 4, 2, 3, 4), &mut rng);
        let (mut direct, mut replayed) = (b.from_host(&acc0).unwrap(), b.from_host(&acc0).unwrap());
        let work = |acc: &mut crate::backend::cuda::DevTensor| -> crate::Result<()> {
            let p = b.avgpool2(&x)?;
            let q = b.epilogue(
                &p,
                &Epilogue {
                    scale: &[0.5, 2.0, -1.0, 3.0],
                    shift: &[0.25, 0.0, 1.0, -2.0],
                    softplus: true,
                    addend: Addend::None,
                },
            )?;
            b.accumulate(acc, &q)
        };
        for _ in 0..3 {
            work(&mut direct).unwrap();
        }
        rt.begin_capture().unwrap();
        work(&mut replayed).unwrap();
        let graph = rt.end_capture().unwrap();
        assert_eq!(graph.launches(), 3);
        assert_eq!(b.to_host(&replayed).unwrap(), acc0, "capturing ran nothing");
        for _ in 0..3 {
            graph.replay().unwrap();
        }
        let (d, r) = (b.to_host(&direct).unwrap(), b.to_host(&replayed).unwrap());
        assert!(d.all_finite());
        assert_eq!(d.data, r.data, "three replays = three direct runs, bit for bit");
        assert_ne!(d.data, acc0.data);
        drop(graph);

        let mut refused = |what: &str, op: &dyn Fn() -> crate::Result<()>| {
            rt.begin_capture().unwrap();
            work(&mut replayed).unwrap();
            let e = op().expect_err(what).to_string();
            assert!(e.contains("during a graph capture") && e.contains(what), "{e}");
            assert!(!rt.capturing(), "{what}: the capture ended");
            assert!(rt.end_capture().is_err());
        };
        refused("device-to-host copy", &|| b.to_host(&x).map(|_| ()));
        refused("wait for the device", &|| rt.synchronize());
        refused("upload", &|| b.from_host(&acc0).map(|_| ()));
        rt.begin_capture().unwrap();
        let kept = b.avgpool2(&x).unwrap();
        let e = rt
            .end_capture()
            .err()
            .expect("an allocation outlives the capture")
            .to_string();
        assert!(e.contains("still alive"), "{e}");
        drop(kept);
        // the runtime works normally afterwards
        work(&mut direct).unwrap();
        assert!(b.to_host(&direct).unwrap().all_finite());
    }

    /// A resident step on the emulated device (weights gathered from the master copy on
    /// the device, batch norm folded there, the loss's constants there, gradients reduced
    /// into their slots of the device buffer, Adam and the statistics there) equals, bit
    /// for bit, the former path on the same device: host weights uploaded per op, batch
    /// statistics downloaded and folded on the host, the gradients downloaded per layer,
    /// Adam and the running statistics on the host. Checks that every gradient lands in
    /// its own slot (β and γ included) and every packed weight layout is the host's; the
    /// step downloads nothing until the poll.
    #[test]
    fn emulated_resident_step_equals_the_host_optimizer_on_device_gradients() {
        use crate::backend::optim::update_running_stats;
        use crate::train::trainer::train_step_resident;
        let exec = Arc::new(EmuExec::default());
        let b = CudaTrainBackend::on_exec(exec.clone(), true);
        let cfg = TrainConfig::default();
        let model = Model::<f32>::init(ModelConfig::default(), 6);
        let mut resident = TrainState::new(model.clone(), &cfg);
        let mut host = TrainState::new(model, &cfg);
        let mut opt = b.opt_new(&resident.model, &resident.adam).unwrap();
        let shape = Shape::new(2, 1, 8, 8, 12);
        for step in 0..3 {
            let mut rng = ChaCha8Rng::seed_from_u64(40 + step);
            let x = Tensor::from_vec(shape, (0..shape.len()).map(|_| rng.random_range(0.0f32..1.0)).collect()).unwrap();
            let g = Tensor {
                shape,
                data: x.data.iter().map(|v| v * v).collect(),
            };
            // the former path: host gradients, host Adam
            let (want_terms, grads, stats) = {
                let net = Rln::new(&b, &host.model);
                let fwd = net.forward(&b.from_host(&x).unwrap(), BnMode::Batch, true).unwrap();
                let gd = b.from_host(&g).unwrap();
                let (t, dy, de) = b
                    .loss(&fwd.prediction, &fwd.e1_raw, &b.from_host(&x).unwrap(), &gd)
                    .unwrap();
                (t, net.backward(&fwd, &dy, &de, cfg.grad_mode).unwrap(), fwd.batch_stats)
            };
            host.adam.update(&mut host.model.params, &grads);
            update_running_stats(&mut host.model, &stats);
            host.step += 1;
            let syncs = exec.dtoh_count.load(std::sync::atomic::Ordering::Relaxed);
            let terms = train_step_resident(&b, &mut opt, &mut resident, &cfg, &x, &g).unwrap();
            let syncs = exec.dtoh_count.load(std::sync::atomic::Ordering::Relaxed) - syncs;
            assert_eq!(
                syncs, 3,
                "only the poll after the step (state, status, loss): no gradient, statistic or weight in between"
            );
            assert_eq!(terms.loss.to_bits(), want_terms.loss.to_bits());
            assert_eq!(resident.model, host.model, "weights and statistics after step {step}");
            resident.adam = b.opt_download(&opt, &mut resident.model).unwrap();
            assert_eq!(resident, host, "moments and step counter after step {step}");
        }
    }

    fn tiny_data() -> crate::train::data::Dataset {
        use crate::imaging::volume::Volume;
        use crate::train::data::{Dataset, Pair};
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let dims = [16, 16, 16];
        let n = 16 * 16 * 16;
        let gt: Vec<f32> = (0..n).map(|_| rng.random_range(0.0f32..1.0).powi(3)).collect();
        let x: Vec<f32> = gt.iter().map(|v| 5.0 * v + rng.random_range(0.0f32..0.3)).collect();
        Dataset {
            pairs: vec![Pair::new(
                "tiny".into(),
                vec![Volume::new(dims, x).unwrap()],
                Volume::new(dims, gt).unwrap(),
            )
            .unwrap()],
        }
    }

    fn tiny_cfg() -> TrainConfig {
        TrainConfig {
            steps: 4,
            epoch_steps: 2,
            sampler: crate::train::data::CropSampler {
                crop: [8, 8, 8],
                batch: 1,
                ..Default::default()
            },
            seed: 3,
            val_crop: [8, 8, 8],
            ..TrainConfig::default()
        }
    }

    /// (b) Mixed precision trains like FP32 on the emulated device: 12 resident steps on
    /// the same batches from the same initial model; the mixed run's loss stays finite,
    /// falls as FP32's does, and every step's loss is within 2e-3 relative of FP32's
    /// (measured: 1.7e-4, printed). The bound: bf16 operands (u = 2⁻⁸ ≈ 3.9e-3) change
    /// each conv output by ~u relative and the loss (a mean over many voxels) by much
    /// less; Adam moves each weight by about ±lr whatever the gradient's size, so the runs
    /// drift apart slowly. 2e-3 (u/2) leaves 12× margin over the measured drift, while a
    /// wrong mixed gradient (a misindexed fragment) moves the loss by far more.
    #[test]
    fn mixed_precision_training_tracks_fp32() {
        use crate::train::trainer::train_step_resident;
        let cfg = TrainConfig::default();
        let model = Model::<f32>::init(ModelConfig::default(), 21);
        let shape = Shape::new(2, 1, 8, 8, 16);
        let batches: Vec<(Tensor<f32>, Tensor<f32>)> = (0..4)
            .map(|i| {
                let mut rng = ChaCha8Rng::seed_from_u64(60 + i);
                let x =
                    Tensor::from_vec(shape, (0..shape.len()).map(|_| rng.random_range(0.0f32..1.0)).collect()).unwrap();
                let g = Tensor {
                    shape,
                    data: x.data.iter().map(|v| v * v).collect(),
                };
                (x, g)
            })
            .collect();
        let mut curves = vec![];
        for precision in [TrainPrecision::Fp32, TrainPrecision::Mixed] {
            let mut b = CudaTrainBackend::on_exec(Arc::new(EmuExec::default()), true);
            b.set_precision(precision);
            let mut st = TrainState::new(model.clone(), &cfg);
            let mut opt = b.opt_new(&st.model, &st.adam).unwrap();
            let mut losses = vec![];
            for step in 0..12 {
                let (x, g) = &batches[step % batches.len()];
                let t = train_step_resident(&b, &mut opt, &mut st, &cfg, x, g).unwrap();
                assert!(t.loss.is_finite(), "{precision} step {step}: loss {}", t.loss);
                losses.push(t.loss);
            }
            curves.push(losses);
        }
        let (f, m) = (&curves[0], &curves[1]);
        let worst = f.iter().zip(m).map(|(a, b)| ((a - b) / a).abs()).fold(0.0f64, f64::max);
        eprintln!("loss fp32 {f:?}\nloss mixed {m:?}\nworst relative difference {worst:.2e}");
        assert!(
            f[8..].iter().sum::<f64>() < f[..4].iter().sum::<f64>(),
            "FP32 learns: {f:?}"
        );
        assert!(
            m[8..].iter().sum::<f64>() < m[..4].iter().sum::<f64>(),
            "mixed learns: {m:?}"
        );
        assert!(
            worst <= 2e-3,
            "mixed vs FP32 loss: worst relative difference {worst:e} > 2e-3"
        );
        assert!(
            worst > 0.0,
            "mixed precision changed nothing: the tensor-core path did not run"
        );
    }

    /// (c, for both precisions) The training loop on the emulated device with its step recorded as graphs (two,
    /// one per batch buffer) and replayed equals the loop run op by op, bit for bit
    /// (weights, statistics, moments, step counters, and the loss it reports), over 7
    /// steps: 1 op by op, 2 recordings each replayed at once, 4 more replays; the loss and
    /// state are read every `POLL_EVERY` steps and at checkpoints only.
    #[test]
    fn replayed_training_steps_equal_uncaptured_steps_bit_for_bit() {
        for precision in [TrainPrecision::Fp32, TrainPrecision::Mixed] {
            replayed_steps_equal_uncaptured_steps(precision);
        }
    }

    fn replayed_steps_equal_uncaptured_steps(precision: TrainPrecision) {
        use crate::train::trainer::{train_on, TrainObserver};
        #[derive(Default)]
        struct Losses(Vec<(u64, u64)>);
        impl TrainObserver for Losses {
            fn on_step(&mut self, step: u64, t: &crate::backend::loss::LossTerms, _lr: f64) {
                self.0.push((step, t.loss.to_bits()));
            }
        }
        let data = tiny_data();
        let cfg = TrainConfig { steps: 7, ..tiny_cfg() };
        let model = Model::<f32>::init(ModelConfig::default(), 8);
        let mut runs = vec![];
        for graphs in [false, true] {
            let exec = Arc::new(EmuExec::default());
            let mut b = CudaTrainBackend::on_exec(exec.clone(), true);
            b.set_graphs(graphs);
            b.set_precision(precision);
            let mut st = TrainState::new(model.clone(), &cfg);
            let mut obs = Losses::default();
            train_on(&b, false, &mut st, &cfg, &data, None, 0, None, &mut obs).unwrap();
            let replays = exec.replays.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(replays, if graphs { 6 } else { 0 }, "graphs {graphs}");
            // item 5: the replays after the two recordings upload x and g through the
            // staged (pinned, copy-stream) path, each after the step that read its buffer
            let staged = exec.staged_uploads.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(staged, if graphs { 8 } else { 0 }, "graphs {graphs}");
            runs.push((st, obs.0));
        }
        assert_eq!(runs[0].0.step, 7);
        assert_ne!(runs[0].0.model, model);
        assert_eq!(runs[1].0, runs[0].0, "{precision}: replayed = op by op, bit for bit");
        assert_eq!(
            runs[1].1, runs[0].1,
            "{precision}: the same losses, read at the same steps"
        );
        assert_eq!(
            runs[0].1.iter().map(|l| l.0).collect::<Vec<_>>(),
            [7],
            "polled at the end only"
        );
    }

    /// Training on the emulated device stopped after step 2, checkpointed to a file and
    /// resumed equals the uninterrupted run bit for bit (weights, running statistics, Adam's
    /// moments, step counters); the device's checkpoint continues on the CPU and the CPU's
    /// on the device (the state moves unchanged both ways).
    #[test]
    fn emulated_resume_is_bit_exact_and_checkpoints_move_between_backends() {
        use crate::train::trainer::{load_checkpoint, save_checkpoint, train_on, TrainObserver};
        struct Quiet;
        impl TrainObserver for Quiet {}
        let b = emulated();
        let (data, cfg) = (tiny_data(), tiny_cfg());
        let model = Model::<f32>::init(ModelConfig::default(), 4);
        let mut straight = TrainState::new(model.clone(), &cfg);
        train_on(&b, false, &mut straight, &cfg, &data, None, 0, None, &mut Quiet).unwrap();
        assert_eq!((straight.step, straight.adam.step), (4, 4));
        let mut first = TrainState::new(model.clone(), &cfg);
        train_on(&b, false, &mut first, &cfg, &data, None, 0, Some(2), &mut Quiet).unwrap();
        let path = std::env::temp_dir().join(format!("rln-h16-resume-{}.safetensors", std::process::id()));
        save_checkpoint(&path, &first, &cfg, &data.fingerprint()).unwrap();
        let (mut resumed, cfg2, _) = load_checkpoint(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(resumed, first, "the checkpoint holds the downloaded state");
        train_on(&b, false, &mut resumed, &cfg2, &data, None, 0, None, &mut Quiet).unwrap();
        assert_eq!(resumed, straight, "resumed at step 2 = uninterrupted, bit for bit");

        // device checkpoint → CPU, and CPU state → device: the state round-trips unchanged
        let mut cpu_first = TrainState::new(model, &cfg);
        train_on(&CPU, false, &mut cpu_first, &cfg, &data, None, 0, Some(2), &mut Quiet).unwrap();
        for st in [&first, &cpu_first] {
            let opt = b.opt_new(&st.model, &st.adam).unwrap();
            let mut m = st.model.clone();
            m.params.zip_mut(&st.model.params, |w, _| *w = f32::NAN);
            assert_eq!(b.opt_download(&opt, &mut m).unwrap(), st.adam);
            assert_eq!(m, st.model);
        }
        let (mut on_cpu, mut on_dev) = (first.clone(), cpu_first.clone());
        train_on(&CPU, false, &mut on_cpu, &cfg, &data, None, 0, Some(3), &mut Quiet).unwrap();
        train_on(&b, false, &mut on_dev, &cfg, &data, None, 0, Some(3), &mut Quiet).unwrap();
        for st in [&on_cpu, &on_dev] {
            assert_eq!((st.step, st.adam.step), (3, 3));
            assert!(st.model.params.all_finite());
        }
        // one step from (nearly) the same state on the two backends: the f32 convs differ
        // in rounding only, so the weights agree closely (Adam's step is ≤ lr_t per weight)
        let e = worst_param_err(&on_dev.model.params.cast(), &on_cpu.model.params.cast());
        assert!(e < 1e-3, "CPU and device one step from step 2: {e:e}");
    }
}
