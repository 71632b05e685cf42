//! The one CPU emulation of the FP32-core conv tile, kernels/conv3_tile.cuh (test-only):
//! its geometry, the halo staging `conv3_stage_tile` and the accumulation of `conv3_tile`,
//! line by line. The inference emulation (emulate.rs `conv3_ffma`: folded bias and the
//! fused RL epilogues) and the training emulation (emulate_train.rs `tconv_fwd`, which is
//! also the data gradient, and `tconv_wgrad`'s staging) both run on it, so a mistake here
//! fails the tests of both. (What this cannot catch: a difference between these lines and
//! the .cuh lines; keep them side by side.)

use crate::tensor::Shape;

// namespace conv3 of conv3_tile.cuh
pub const TX: usize = 32;
pub const TY: usize = 8;
pub const TZ: usize = 4;
pub const VX: usize = 4;
pub const SX: usize = TX + 2;
pub const SY: usize = TY + 2;
pub const SZ: usize = TZ + 2;
pub const RS: usize = 38;
pub const PS: usize = SY * RS;
pub const CS: usize = SZ * PS;
pub const NPOS: usize = SZ * SY * SX;
pub const THREADS: usize = (TX / VX) * TY * TZ;
pub const TILE_V: usize = TX * TY * TZ;
/// The most output channels a thread accumulates (training's run-time limit; inference ≤ 8).
const MAX_COUT: usize = 16;

/// conv3::chunk: input channels staged per pass, a divisor of C_in, at most 5.
pub fn chunk(cin: usize) -> usize {
    if cin.is_multiple_of(4) {
        4
    } else if cin.is_multiple_of(5) {
        5
    } else if cin <= 5 {
        cin
    } else {
        1
    }
}

/// Channels-last f32 inputs of one launch (the virtual concatenation, in order, with their
/// channel counts) and the volume (n, d, h, w; the channel count of `s` is not used).
pub struct ConvIn<'a> {
    pub inputs: Vec<(&'a [f32], usize)>,
    pub s: Shape,
}

impl ConvIn<'_> {
    /// The loader: channel c of the concatenation at voxel vox.
    pub fn load_concat(&self, vox: usize, c: usize) -> f32 {
        let mut c = c;
        for (data, ch) in &self.inputs {
            if c < *ch {
                return data[vox * ch + c];
            }
            c -= ch;
        }
        0.0
    }
    pub fn cin(&self) -> usize {
        self.inputs.iter().map(|i| i.1).sum()
    }
    /// conv3_stage_tile: channels c0..c0+ck of the tile at (n, z0, y0, x0) with a one-voxel
    /// halo (zeros outside the volume) as planes [cc][sz][sy][RS].
    #[allow(clippy::too_many_arguments)]
    pub fn stage_tile(&self, sin: &mut [f32], ck: usize, n: usize, z0: usize, y0: usize, x0: usize, c0: usize) {
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

/// conv3_tile over every block of `grid` (the grid the host launches: x tiles, y tiles,
/// n · z tiles) with weights `w` [ci][kz][ky][kx][co]: calls `epi(vox, z)` with the C_out
/// sums z of every output voxel inside the volume, block by block, thread by thread, as
/// `epi.voxel` is called on the device.
pub fn conv3_tile(a: &ConvIn, w: &[f32], cout: usize, grid: (u32, u32, u32), mut epi: impl FnMut(usize, &[f32])) {
    let s = a.s;
    let cin = a.cin();
    let ck = chunk(cin);
    assert_eq!(cin % ck, 0, "chunk must divide C_in");
    assert!(cout <= MAX_COUT, "C_out ≤ {MAX_COUT}");
    assert_eq!(w.len(), cin * 27 * cout, "weights [ci][27][co]");
    let (gx, gy, gz) = grid;
    let tiles_z = s.d.div_ceil(TZ);
    let mut sin = vec![f32::NAN; ck * CS];
    let mut zv = vec![0.0f32; cout];
    for bz in 0..gz as usize {
        for by in 0..gy as usize {
            for bx in 0..gx as usize {
                let n = bz / tiles_z;
                let (z0, y0, x0) = ((bz - n * tiles_z) * TZ, by * TY, bx * TX);
                let mut acc = vec![[[0.0f32; VX]; MAX_COUT]; THREADS];
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
                                                acc[c][v] = w[wk + c].mul_add(inp[v + kx], acc[c][v]);
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
                                zv[c] = acc[c][v];
                            }
                            epi(row_vox + x, &zv);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `constexpr int NAME = value` of kernels/conv3_tile.cuh (namespace conv3).
    fn cuh_constant(src: &str, name: &str) -> usize {
        let code: String = src
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        for stmt in code.split(';') {
            for decl in stmt.split(',') {
                let decl = decl.rsplit("constexpr int ").next().unwrap_or("").trim();
                if let Some(v) = decl.strip_prefix(name).and_then(|r| r.trim_start().strip_prefix('=')) {
                    if let Ok(v) = v.trim().parse() {
                        return v;
                    }
                }
            }
        }
        panic!("{name} not found in kernels/conv3_tile.cuh");
    }

    #[test]
    fn geometry_is_the_one_of_conv3_tile_cuh() {
        let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/conv3_tile.cuh")).unwrap();
        for (name, v) in [("TX", TX), ("TY", TY), ("TZ", TZ), ("VX", VX), ("RS", RS)] {
            assert_eq!(cuh_constant(&src, name), v, "{name}");
        }
        assert_eq!(THREADS, 256);
        assert_eq!(CS, 2280, "channel stride (kernels/NOTES.md)");
        // and the host's tiles are this tile
        assert_eq!(super::super::launch::FFMA_TILE, [TZ, TY, TX]);
        assert_eq!(super::super::train_launch::TILE, [TZ, TY, TX]);
        for cin in 1..=20 {
            assert_eq!(chunk(cin), super::super::launch::ffma_chunk(cin), "C_in {cin}");
            assert_eq!(chunk(cin), super::super::train_launch::chunk(cin), "C_in {cin}");
        }
    }
}
