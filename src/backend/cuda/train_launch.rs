//! What the host must know about the training kernels (kernels/train_conv.cu,
//! kernels/train_ops.cu): the parameter block (twin of `TrainArgs` in
//! kernels/train_common.cuh), the specialized conv kernels and their shared memory, grids,
//! and the host-side weight packing. Pure host code: unit-tested without a GPU.

use crate::tensor::Shape;

/// The one parameter block of every training kernel (kernels/train_common.cuh
/// `TrainArgs`). Device pointers are raw `CUdeviceptr`s; 0 is null.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TrainArgs {
    pub inp: [u64; 4],
    pub out: [u64; 3],
    pub wt: u64,
    pub part: u64,
    pub stat: u64,
    pub count: i64,
    pub n: i32,
    pub d: i32,
    pub h: i32,
    pub w: i32,
    pub ca: i32,
    pub cb: i32,
    pub cc: i32,
    pub cout: i32,
    pub mode: i32,
    pub k0: i32,
    pub k1: i32,
    pub k2: i32,
    pub f: [f32; 4],
    pub dc: [f64; 8],
    pub p: [[f32; 16]; 4],
}
const _: () = assert!(std::mem::size_of::<TrainArgs>() == 472);

// SAFETY: plain-old-data with the C layout of TrainArgs (checked size; field order equal).
unsafe impl cudarc::driver::DeviceRepr for TrainArgs {}

impl TrainArgs {
    /// n, d, h, w of a shape.
    pub fn dims(mut self, s: Shape) -> Self {
        self.n = s.n as i32;
        self.d = s.d as i32;
        self.h = s.h as i32;
        self.w = s.w as i32;
        self
    }
}

/// Epilogue flags of `TrainArgs::mode` (kernels/train_common.cuh).
pub const EPI_SOFTPLUS: i32 = 1;
pub const ADD_CONST: i32 = 1 << 1;
pub const ADD_SOFTPLUS: i32 = 2 << 1;
/// Forward convs: the epilogue also writes its outputs' batch statistics, part[block][2·C_out]
/// = [Σ y | Σ y²] (f64), block = x + gx·(y + gy·z) of the launch grid (RLN_EPI_STATS).
pub const EPI_STATS: i32 = 1 << 3;

/// The blocks of a 3-D launch grid (the rows of the conv epilogue's statistics partials).
pub fn grid_blocks(g: (u32, u32, u32)) -> usize {
    g.0 as usize * g.1 as usize * g.2 as usize
}

/// The kernels of the two modules, for loading.
pub const CONV_MODULE: &str = "train_conv";
pub const OPS_MODULE: &str = "train_ops";
pub const OPS_KERNELS: [&str; 22] = [
    "t_epilogue",
    "t_avgpool2",
    "t_channel_mean",
    "t_channel_mean_bwd",
    "t_rl_divide",
    "t_rl_divide_bwd",
    "t_rl_update",
    "t_rl_update_bwd",
    "t_accumulate",
    "t_reshape",
    "t_up2_fwd",
    "t_up2_bwd_data",
    "t_up2_wgrad",
    "t_chan_sum",
    "t_epi_bwd1",
    "t_epi_bwd2",
    "t_bn_fold",
    "t_loss_sums",
    "t_loss_finish",
    "t_loss_grad",
    "t_reduce_part",
    "t_gather",
];
pub const CONV_ANY_FWD: &str = "tconv_fwd_any";
pub const CONV_ANY_WGRAD: &str = "tconv_wgrad_any";

/// Channel counts (in[0], in[1], in[2], C_out) of the specialized forward kernels
/// `tconv_fwd_{a}_{b}_{c}_{o}`: the network's convs, then the data gradients.
pub const FWD_VARIANTS: [[usize; 4]; 10] = [
    [1, 0, 0, 4],
    [2, 0, 0, 4],
    [4, 0, 0, 4],
    [4, 4, 0, 4],
    [1, 0, 0, 8],
    [8, 0, 0, 8],
    [8, 8, 0, 8],
    [8, 1, 1, 8],
    [4, 0, 0, 1],
    [8, 0, 0, 1],
];
/// The specialized weight-gradient kernels `tconv_wgrad_{a}_{b}_{c}_{o}`: the network's
/// convs (the first eight forward variants; the data-gradient-only 4→1 and 8→1 have none).
pub const WGRAD_VARIANTS: &[[usize; 4]] = FWD_VARIANTS.split_at(8).0;

/// The wide convs of mixed-precision training on the tensor cores (kernels/conv_mma_train.cuh
/// `tmma_fwd_*_bf16`, `tmma_wgrad_*_bf16`): every forward variant with C_in ≥ 4 and
/// C_out ≥ 4 (also the data gradients 4→4 and 8→8 of these layers, which are forward
/// convs on flipped, transposed weights). The 1→k convs, their k→1 data gradients and the
/// 2→4 of the dual-view variant stay on the FP32 cores (NOTES: "Mixed precision").
pub const MMA_VARIANTS: [[usize; 4]; 5] = [[4, 0, 0, 4], [4, 4, 0, 4], [8, 0, 0, 8], [8, 8, 0, 8], [8, 1, 1, 8]];

pub fn mma_fwd_name(v: [usize; 4]) -> String {
    format!("tmma_fwd_{}_{}_{}_{}_bf16", v[0], v[1], v[2], v[3])
}
pub fn mma_wgrad_name(v: [usize; 4]) -> String {
    format!("tmma_wgrad_{}_{}_{}_{}_bf16", v[0], v[1], v[2], v[3])
}

/// The tensor-core training tile (namespace tmma of kernels/conv_mma_train.cuh): 16×8×8
/// output voxels (x, y, z), staged with a one-voxel halo.
pub const MMA_TILE: [usize; 3] = [8, 8, 16];
pub const MMA_STAGED_VOXELS: usize = 18 * 10 * 10;
/// K chunks of 16 of a conv over `cin` channels (k = tap·C_in + c, K = 27·C_in padded).
pub const fn mma_chunks(cin: usize) -> usize {
    (27 * cin).div_ceil(16)
}
pub const fn mma_fwd_smem_bytes(cin: usize) -> usize {
    MMA_STAGED_VOXELS * cin * 2 + mma_chunks(cin) * 32 * 8
}
pub const fn mma_wgrad_smem_bytes(cin: usize) -> usize {
    MMA_STAGED_VOXELS * cin * 2 + 1024 * 8 * 2
}
/// Tiles of the tensor-core training tile: (x tiles, y tiles, z tiles · n).
pub fn mma_grid(s: Shape) -> (u32, u32, u32) {
    (
        s.w.div_ceil(MMA_TILE[2]) as u32,
        s.h.div_ceil(MMA_TILE[1]) as u32,
        (s.d.div_ceil(MMA_TILE[0]) * s.n) as u32,
    )
}
pub fn mma_tiles(s: Shape) -> usize {
    let g = mma_grid(s);
    g.0 as usize * g.1 as usize * g.2 as usize
}

pub fn fwd_name(v: [usize; 4]) -> String {
    format!("tconv_fwd_{}_{}_{}_{}", v[0], v[1], v[2], v[3])
}
pub fn wgrad_name(v: [usize; 4]) -> String {
    format!("tconv_wgrad_{}_{}_{}_{}", v[0], v[1], v[2], v[3])
}

/// Every training kernel with its dynamic shared memory (bytes).
pub fn kernel_list() -> Vec<(&'static str, String, usize)> {
    let mut v: Vec<(&'static str, String, usize)> = Vec::new();
    for k in FWD_VARIANTS {
        let cin = k[0] + k[1] + k[2];
        v.push((CONV_MODULE, fwd_name(k), fwd_smem_bytes(cin, k[3])));
    }
    for &k in WGRAD_VARIANTS {
        let cin = k[0] + k[1] + k[2];
        v.push((CONV_MODULE, wgrad_name(k), wgrad_smem_bytes(cin, k[3])));
    }
    for k in MMA_VARIANTS {
        let cin = k[0] + k[1] + k[2];
        v.push((CONV_MODULE, mma_fwd_name(k), mma_fwd_smem_bytes(cin)));
        v.push((CONV_MODULE, mma_wgrad_name(k), mma_wgrad_smem_bytes(cin)));
    }
    v.push((CONV_MODULE, CONV_ANY_FWD.into(), 0));
    v.push((CONV_MODULE, CONV_ANY_WGRAD.into(), 0));
    for k in OPS_KERNELS {
        v.push((OPS_MODULE, k.into(), 0));
    }
    v
}

// ---- the conv tile (kernels/conv3_tile.cuh namespace conv3, instantiated in train_conv.cu): the FP32-core tile of the
// inference kernels, whose geometry launch.rs holds (checked against both sources there) ----

pub use super::launch::{ffma_chunk as chunk, FFMA_THREADS as THREADS, FFMA_TILE as TILE};
use super::launch::{FFMA_CS as CS, FFMA_TILE_VOXELS as TILE_VOXELS};
pub const fn fwd_smem_bytes(cin: usize, cout: usize) -> usize {
    ((cin * 27 * cout).div_ceil(4) * 4 + chunk(cin) * CS) * 4
}
pub const fn wgrad_smem_bytes(cin: usize, cout: usize) -> usize {
    (TILE_VOXELS * cout + chunk(cin) * CS) * 4
}

/// Tiles of a volume: (x tiles, y tiles, z tiles · n).
pub fn conv_grid(s: Shape) -> (u32, u32, u32) {
    (
        s.w.div_ceil(TILE[2]) as u32,
        s.h.div_ceil(TILE[1]) as u32,
        (s.d.div_ceil(TILE[0]) * s.n) as u32,
    )
}

pub fn conv_tiles(s: Shape) -> usize {
    s.w.div_ceil(TILE[2]) * s.h.div_ceil(TILE[1]) * s.d.div_ceil(TILE[0]) * s.n
}

/// Blocks (per channel chunk) of a weight-gradient launch: about 528 blocks in all (four
/// per SM of an H100), at most one per tile. A constant, not the device's SM count, so
/// that the summation order and thus the result are the same on every device.
pub fn wgrad_blocks(tiles: usize, chunks: usize) -> usize {
    (528 / chunks).clamp(1, tiles.max(1))
}

/// Blocks of a reduction over `count` elements (fixed for a count: deterministic sums).
pub fn reduction_blocks(count: usize) -> usize {
    count.div_ceil(2048).clamp(1, 1024)
}

/// Voxels per chunk of the run-time-channel weight gradient and of up2's weight gradient.
pub const ANY_WGRAD_CHUNK: usize = 4096;
pub const UP2_WGRAD_CHUNK: usize = 1024;

/// Engine conv weights [co][ci][27] → the kernels' [ci][27][co].
pub fn pack_fwd(weight: &[f32], c_in: usize, c_out: usize) -> Vec<f32> {
    assert_eq!(weight.len(), c_in * c_out * 27, "conv weight size");
    let mut p = vec![0.0f32; weight.len()];
    for co in 0..c_out {
        for ci in 0..c_in {
            for k in 0..27 {
                p[(ci * 27 + k) * c_out + co] = weight[(co * c_in + ci) * 27 + k];
            }
        }
    }
    p
}

/// The data gradient of a conv with respect to input channels `offset..offset+cs` is a
/// conv of dz with these weights (engine layout, C_in' = c_out, C_out' = cs): flipped in
/// space, transposed in (in, out); the same as backend::cpu::conv3::conv3_backward_data.
pub fn flip_transpose(weight: &[f32], c_total: usize, c_out: usize, offset: usize, cs: usize) -> Vec<f32> {
    let mut wt = vec![0.0f32; cs * c_out * 27];
    for i in 0..cs {
        for o in 0..c_out {
            for k in 0..27 {
                wt[(i * c_out + o) * 27 + k] = weight[(o * c_total + offset + i) * 27 + 26 - k];
            }
        }
    }
    wt
}

/// Per-channel parameter arrays of at most 16 channels, `fill` beyond `v`.
pub fn channel_array(v: &[f32], channels: usize, fill: f32) -> [f32; 16] {
    assert!(
        channels <= 16,
        "the training kernels take at most 16 channels, got {channels}"
    );
    let mut a = [fill; 16];
    if !v.is_empty() {
        assert_eq!(
            v.len(),
            channels,
            "{} per-channel values for {channels} channels",
            v.len()
        );
        a[..channels].copy_from_slice(v);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_fits_two_blocks_per_sm() {
        for k in FWD_VARIANTS.iter().chain(WGRAD_VARIANTS.iter()) {
            let cin = k[0] + k[1] + k[2];
            assert!(fwd_smem_bytes(cin, k[3]) * 2 <= 227 * 1024, "{k:?}");
            assert!(wgrad_smem_bytes(cin, k[3]) * 2 <= 227 * 1024, "{k:?}");
            assert_eq!(cin % chunk(cin), 0);
        }
        assert_eq!(wgrad_smem_bytes(16, 8), (1024 * 8 + 4 * 2280) * 4);
        // the same formula as conv3::fwd_smem_bytes, with NW rounded to 16 bytes
        assert_eq!(fwd_smem_bytes(8, 1), (216 + 4 * 2280) * 4);
        assert_eq!(fwd_smem_bytes(1, 4), (108 + 2280) * 4);
    }

    #[test]
    fn every_training_kernel_is_in_its_module() {
        use crate::backend::cuda::kernels::module;
        let list = kernel_list();
        assert_eq!(
            list.len(),
            FWD_VARIANTS.len() + WGRAD_VARIANTS.len() + 2 * MMA_VARIANTS.len() + 2 + OPS_KERNELS.len()
        );
        for (m, name, _) in &list {
            let km = module(m).unwrap_or_else(|| panic!("module {m} not embedded"));
            let generic = (name.starts_with("tconv_") && !name.ends_with("_any")) || name.starts_with("tmma_");
            assert!(
                generic || km.source.contains(&format!("{name}(const TrainArgs")),
                "{name} not in kernels/{m}.cu"
            );
            if let Some(ptx) = km.ptx {
                assert!(ptx.contains(&format!(".entry {name}(")), "{name} not in the PTX of {m}");
            }
        }
        // and every entry of the two modules is listed (nothing compiled but unreachable)
        for m in [CONV_MODULE, OPS_MODULE] {
            if let Some(ptx) = module(m).unwrap().ptx {
                for l in ptx.lines().filter(|l| l.contains(".entry ")) {
                    let name = l.split(".entry ").nth(1).unwrap().split('(').next().unwrap();
                    assert!(
                        list.iter().any(|(_, n, _)| n == name),
                        "{name} of {m} is not in kernel_list"
                    );
                }
            }
        }
    }

    #[test]
    fn mma_kernels_are_the_wide_forward_convs_and_fit_two_blocks_per_sm() {
        for k in MMA_VARIANTS {
            let cin = k[0] + k[1] + k[2];
            assert!(FWD_VARIANTS.contains(&k) && WGRAD_VARIANTS.contains(&k), "{k:?}");
            assert!(cin >= 4 && cin % 2 == 0 && k[3] >= 4 && k[3] <= 8, "{k:?}");
            assert!(mma_fwd_smem_bytes(cin) * 2 <= 227 * 1024 && mma_wgrad_smem_bytes(cin) * 2 <= 227 * 1024);
        }
        // every wide layer (C_in ≥ 4, C_out ≥ 4) is on the tensor cores in mixed mode
        for k in FWD_VARIANTS {
            let wide = k[0] + k[1] + k[2] >= 4 && k[3] >= 4;
            assert_eq!(MMA_VARIANTS.contains(&k), wide, "{k:?}");
        }
        assert_eq!(mma_chunks(8), 14);
        assert_eq!(mma_chunks(10), 17);
        assert_eq!(mma_chunks(16), 27);
        assert_eq!(mma_grid(Shape::new(4, 1, 64, 64, 64)), (4, 8, 32));
        assert_eq!(mma_fwd_smem_bytes(16), 1800 * 32 + 27 * 256);
    }

    #[test]
    fn flip_transpose_matches_the_cpu_data_gradient() {
        use crate::backend::cpu::conv3;
        use crate::backend::cpu::CpuEpilogue;
        use crate::tensor::Tensor;
        let s = Shape::new(1, 3, 4, 5, 6);
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let (c_out, ca, cb) = (2, 1, 2);
        let dz = Tensor::from_vec(s.with_c(c_out), (0..s.with_c(c_out).len()).map(|_| rnd()).collect()).unwrap();
        let w: Vec<f32> = (0..c_out * (ca + cb) * 27).map(|_| rnd()).collect();
        let want = conv3::conv3_backward_data(&dz, &w, &[ca, cb], &[true, true]);
        for (i, (off, cs)) in [(0, ca), (ca, cb)].into_iter().enumerate() {
            let wt = flip_transpose(&w, ca + cb, c_out, off, cs);
            let got = conv3::conv3_forward(&[&dz], &wt, cs, &CpuEpilogue::identity(cs));
            assert_eq!(got, *want[i].as_ref().unwrap());
        }
    }

    #[test]
    fn grids_and_reductions_are_fixed_by_the_size() {
        assert_eq!(conv_grid(Shape::new(4, 1, 64, 64, 64)), (2, 8, 64));
        assert_eq!(conv_tiles(Shape::new(4, 1, 64, 64, 64)), 1024);
        assert_eq!(conv_tiles(Shape::new(1, 1, 5, 9, 33)), 2 * 2 * 2);
        assert_eq!(wgrad_blocks(1024, 4), 132);
        assert_eq!(wgrad_blocks(3, 1), 3);
        assert_eq!(reduction_blocks(1), 1);
        assert_eq!(reduction_blocks(8 << 20), 1024);
        // the reduction kernels fix one channel per thread: the stride must be a multiple of C
        for c in [1usize, 2, 4, 8, 16] {
            assert_eq!((THREADS as usize * reduction_blocks(12345)) % c, 0);
        }
    }
}
