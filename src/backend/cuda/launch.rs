//! What the host must know about each kernel: the parameter block (twin of `RlnArgs` in
//! kernels/rln_common.cuh), tile geometry, grids and shared-memory sizes (twins of the
//! constants in kernels/conv3_tile.cuh and kernels/conv3_mma.cuh), and the table of conv
//! kernels per layer. Pure host code: unit-tested without a GPU.

use super::Precision;
use crate::error::{Error, Result};
use crate::model::L;
use crate::tensor::{Shape, Tensor};

/// The one parameter block of every kernel (kernels/rln_common.cuh `RlnArgs`). Device
/// pointers are raw `CUdeviceptr`s; 0 is null.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelArgs {
    pub in0: u64,
    pub in1: u64,
    pub in2: u64,
    pub wt: u64,
    pub bias: u64,
    pub aux: u64,
    pub out: u64,
    pub out_raw: u64,
    pub n: i32,
    pub d: i32,
    pub h: i32,
    pub w: i32,
    pub post_scale: f32,
    pub post_shift: f32,
    pub eps: f32,
    pub pad_: i32,
}
const _: () = assert!(std::mem::size_of::<KernelArgs>() == 96);

// SAFETY: plain-old-data with the C layout of RlnArgs (checked size; field order equal).
unsafe impl cudarc::driver::DeviceRepr for KernelArgs {}

/// The epilogue a conv kernel fuses (kernels/rln_common.cuh `RlnEpilogue`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epi {
    /// out = sp(z), all C_out channels.
    Sp,
    /// dv = BN(a / (cm(sp(z) + sp(a)) + ε)).
    FpDiv,
    /// E = sp(BN(a · cm(sp(z)))), E_raw = a · cm(sp(z)).
    Update,
    /// E = sp(BN(a · cm(sp(z) + 1))).
    UpdatePlus1,
    /// y = cm(sp(z)).
    Mean,
}

/// One conv layer's kernels (kernels/*.cu): `{base}_f32`, `{base}_f16`, `{base}_bf16` on
/// the FP32 cores, and `{base}_mma_f16`, `{base}_mma_bf16` on the tensor cores where
/// `mma` is set.
#[derive(Clone, Copy, Debug)]
pub struct ConvKernel {
    pub layer: L,
    /// The kernels/*.cu file (module) holding it.
    pub module: &'static str,
    pub base: &'static str,
    /// Channels of each concatenated input (1: an f32 one-channel node).
    pub inputs: &'static [usize],
    pub c_out: usize,
    pub epi: Epi,
    pub mma: bool,
    /// The one-channel batch norm the epilogue applies after the RL node (dv, E layers).
    pub post: Option<L>,
}

impl ConvKernel {
    pub fn c_in(&self) -> usize {
        self.inputs.iter().sum()
    }
    /// Whether this layer runs on the tensor cores with storage `p` and `tensor_cores`.
    pub fn uses_mma(&self, p: Precision, tensor_cores: bool) -> bool {
        p != Precision::F32 && tensor_cores && self.mma
    }
    pub fn name(&self, p: Precision, tensor_cores: bool) -> String {
        if self.uses_mma(p, tensor_cores) {
            format!("{}_mma_{}", self.base, p.suffix())
        } else {
            format!("{}_{}", self.base, p.suffix())
        }
    }
}

const fn ck(
    layer: L,
    module: &'static str,
    base: &'static str,
    inputs: &'static [usize],
    c_out: usize,
    epi: Epi,
    mma: bool,
) -> ConvKernel {
    let post = match layer {
        L::H1FpConv3 => Some(L::H1Dv),
        L::H1BpConv4 => Some(L::H1E),
        L::H2FpConv2 => Some(L::H2Dv),
        L::H2BpConv2 => Some(L::H2E),
        _ => None,
    };
    ConvKernel {
        layer,
        module,
        base,
        inputs,
        c_out,
        epi,
        mma,
        post,
    }
}

/// Every conv of the network, in forward order (rln-spec §3).
pub const CONV_KERNELS: [ConvKernel; 14] = [
    ck(L::H1FpConv1, "h1_fp", "h1_fp_conv1", &[1], 4, Epi::Sp, true),
    ck(L::H1FpConv2, "h1_fp", "h1_fp_conv2", &[4], 4, Epi::Sp, true),
    ck(L::H1FpConv3, "h1_fp", "h1_fp_conv3_dv", &[4, 4], 4, Epi::FpDiv, true),
    ck(L::H1BpConv1, "h1_bp", "h1_bp_conv1", &[1], 8, Epi::Sp, true),
    ck(L::H1BpConv2, "h1_bp", "h1_bp_conv2", &[8], 8, Epi::Sp, true),
    ck(L::H1BpConv3, "h1_bp", "h1_bp_conv3", &[8, 8], 8, Epi::Sp, true),
    ck(L::H1BpConv4, "h1_up", "h1_bp_conv4_e1", &[4], 4, Epi::Update, true),
    ck(L::H2FpConv1, "h2", "h2_fp_conv1", &[1], 4, Epi::Sp, true),
    ck(L::H2FpConv2, "h2", "h2_fp_conv2_dv", &[4], 4, Epi::FpDiv, true),
    ck(L::H2BpConv1, "h2", "h2_bp_conv1", &[1], 8, Epi::Sp, true),
    ck(L::H2BpConv2, "h2", "h2_bp_conv2_e2", &[8], 8, Epi::UpdatePlus1, true),
    ck(L::H3Conv1, "h3", "h3_conv1", &[1], 8, Epi::Sp, true),
    ck(L::H3Conv2, "h3", "h3_conv2", &[8, 1, 1], 8, Epi::Sp, true),
    ck(L::H3Conv3, "h3", "h3_conv3_y", &[8, 8], 8, Epi::Mean, true),
];

/// The transposed conv's kernels: `h1_bp_up_f32`, `h1_bp_up_f16`, `h1_bp_up_bf16` (module h1_up).
pub const UP_KERNEL: &str = "h1_bp_up";
/// avgpool2 (module h1_fp), always f32.
pub const POOL_KERNEL: &str = "avgpool2_f32";
/// The predictor's conversions of f16 tiles to the network's f32 input and of its f32
/// output to f16 (kernels/io_half.cu; parameters `runtime::IoArgs`).
pub const IO_MODULE: &str = "io_half";
pub const IO_KERNELS: [&str; 2] = [TO_F32_KERNEL, TO_F16_KERNEL];
pub const TO_F32_KERNEL: &str = "rln_h16_to_f32";
pub const TO_F16_KERNEL: &str = "rln_f32_to_h16";

/// The conv kernel entry of a layer.
pub fn conv_kernel(l: L) -> &'static ConvKernel {
    CONV_KERNELS
        .iter()
        .find(|k| k.layer == l)
        .expect("layer has a conv kernel")
}

/// The up2 kernel of storage `p`.
pub fn up_kernel(p: Precision) -> String {
    format!("{UP_KERNEL}_{}", p.suffix())
}

/// Every precision and tensor-core setting a network can run with.
pub const MODES: [(Precision, bool); 5] = [
    (Precision::F32, false),
    (Precision::F16, false),
    (Precision::F16, true),
    (Precision::Bf16, false),
    (Precision::Bf16, true),
];

/// Every kernel name a network of this precision launches, with its module.
pub fn kernel_names(p: Precision, tensor_cores: bool) -> Vec<(&'static str, String)> {
    let mut v: Vec<(&'static str, String)> = CONV_KERNELS
        .iter()
        .map(|k| (k.module, k.name(p, tensor_cores)))
        .collect();
    v.push(("h1_up", up_kernel(p)));
    v.push(("h1_fp", POOL_KERNEL.to_string()));
    v
}

// ---- FP32-core direct conv (kernels/conv3_tile.cuh) ----

/// Output tile (z, y, x) of one block (also the training kernels' tile, train_conv.cu).
pub const FFMA_TILE: [usize; 3] = [4, 8, 32];
pub const FFMA_TILE_VOXELS: usize = FFMA_TILE[0] * FFMA_TILE[1] * FFMA_TILE[2];
pub const FFMA_THREADS: u32 = 256;
/// Shared-memory row stride (floats): ≥ 32 + 2, ≡ 2 mod 4.
pub const FFMA_RS: usize = 38;
/// Shared-memory channel stride: (4+2)·(8+2)·38 floats.
pub const FFMA_CS: usize = (FFMA_TILE[0] + 2) * (FFMA_TILE[1] + 2) * FFMA_RS;

/// Input channels staged per pass (kernels: conv3::chunk).
pub const fn ffma_chunk(cin: usize) -> usize {
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

/// Dynamic shared memory of one block (kernels: conv3::fwd_smem_bytes).
pub const fn ffma_smem_bytes(cin: usize, cout: usize) -> usize {
    (cin * 27 * cout + ffma_chunk(cin) * FFMA_CS) * 4
}

// ---- tensor-core conv (kernels/conv3_mma.cuh) ----

pub const MMA_TILE: [usize; 3] = [8, 8, 16];
pub const MMA_THREADS: u32 = 256;
/// Voxels of the smem tile with its halo.
pub const MMA_NVOX: usize = (MMA_TILE[0] + 2) * (MMA_TILE[1] + 2) * (MMA_TILE[2] + 2);

/// How K = 27 taps × C_in is laid out in chunks of 16 (kernels/conv3_mma.cuh `mmac::layout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmaLayout {
    /// C_in = 4: each smem voxel holds its 4 channels and those of its x neighbour; chunk
    /// (kz, ky): k-half 0 = taps kx 0, 1; k-half 1 = taps kx 2 and a zero-weight 3rd.
    P4,
    /// C_in ≤ 8 padded to 8: k = tap·8 + c, a 28th zero tap.
    C8,
    /// C_in ≤ 16 padded to 16: k = tap·16 + c.
    C16,
    /// C_in = 1: each smem voxel holds 8 consecutive x values; k-half = one (kz, ky)
    /// (rows kx = 0..2 real, 3..7 zero weights), the 10th k-half the zero voxel.
    X1,
}

pub const fn mma_layout(cin: usize) -> MmaLayout {
    if cin == 1 {
        MmaLayout::X1
    } else if cin == 4 {
        MmaLayout::P4
    } else if cin <= 8 {
        MmaLayout::C8
    } else {
        MmaLayout::C16
    }
}
/// 16-bit values per smem voxel (16 B for P4 and C8, 48 B for C16: see conv3_mma.cuh).
pub const fn mma_voxel_halves(cin: usize) -> usize {
    match mma_layout(cin) {
        MmaLayout::C16 => 24,
        _ => 8,
    }
}
/// K chunks of 16.
pub const fn mma_chunks(cin: usize) -> usize {
    match mma_layout(cin) {
        MmaLayout::X1 => 5,
        MmaLayout::P4 => 9,
        MmaLayout::C8 => 14,
        MmaLayout::C16 => 27,
    }
}
/// (tap, input channel) of row k (0..16) of K chunk `chunk`, None for a padding row
/// (channels beyond C_in, the 28th tap of C8, the 4th x tap of P4).
pub fn mma_k_row(cin: usize, chunk: usize, k: usize) -> Option<(usize, usize)> {
    let (tap, ci) = match mma_layout(cin) {
        MmaLayout::C16 => (chunk, k),
        MmaLayout::C8 => (2 * chunk + k / 8, k % 8),
        MmaLayout::P4 => {
            let kx = 2 * (k / 8) + (k % 8) / 4;
            if kx == 3 {
                return None;
            }
            (3 * chunk + kx, k % 4)
        }
        MmaLayout::X1 => {
            let (q, kx) = (2 * chunk + k / 8, k % 8);
            if q >= 9 || kx >= 3 {
                return None;
            }
            (3 * q + kx, 0)
        }
    };
    (ci < cin && tap < 27).then_some((tap, ci))
}
pub const fn mma_smem_bytes(cin: usize) -> usize {
    (MMA_NVOX + 1) * mma_voxel_halves(cin) * 2
}

/// Grid of a tiled conv kernel: (⌈W/tx⌉, ⌈H/ty⌉, ⌈D/tz⌉·N).
pub fn tiled_grid(tile: [usize; 3], n: usize, d: usize, h: usize, w: usize) -> Result<(u32, u32, u32)> {
    let gx = w.div_ceil(tile[2]);
    let gy = h.div_ceil(tile[1]);
    let gz = d.div_ceil(tile[0]) * n;
    if gy > 65_535 || gz > 65_535 || gx > i32::MAX as usize {
        return Err(Error::invalid(format!(
            "tile of {n}×{d}×{h}×{w} voxels is too large for one CUDA launch (grid {gx}×{gy}×{gz}); use smaller tiles"
        )));
    }
    Ok((gx as u32, gy as u32, gz as u32))
}

/// Threads a block of the grid-stride kernels (avgpool2, up2, the conversions, the
/// training ops: `__launch_bounds__(256)` in the .cu files).
pub const ELEMENTWISE_THREADS: u32 = 256;

/// Grid of a grid-stride elementwise kernel ([`ELEMENTWISE_THREADS`] threads a block).
pub fn grid_1d(total: usize) -> u32 {
    total.div_ceil(ELEMENTWISE_THREADS as usize).clamp(1, 132 * 32) as u32
}

/// N×C×D×H×W (the CPU layout) → channels-last N×D×H×W×C (the device layout).
pub fn to_channels_last(t: &Tensor<f32>) -> Vec<f32> {
    t.to_ndhwc()
}

/// Channels-last data → an N×C×D×H×W tensor of `shape`.
pub fn from_channels_last(shape: Shape, data: &[f32]) -> Result<Tensor<f32>> {
    Tensor::from_ndhwc(shape, data)
}

/// Checks that the volume fits the kernels' 32-bit sizes.
pub fn check_dims(n: usize, d: usize, h: usize, w: usize) -> Result<()> {
    let max = i32::MAX as usize / 2;
    if n == 0 || d == 0 || h == 0 || w == 0 {
        return Err(Error::invalid(format!("empty tile {n}×{d}×{h}×{w}")));
    }
    if n > max || d > max || h > max || w > max {
        return Err(Error::invalid(format!(
            "tile {n}×{d}×{h}×{w} has a dimension too large for the CUDA kernels"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smem_sizes_fit_an_sm90_block() {
        // 227 KB is the opt-in limit per block on sm_90; 3 blocks of the largest
        // FFMA kernel and 2 of the largest mma kernel must fit one SM's 228 KB
        for k in CONV_KERNELS.iter() {
            let b = ffma_smem_bytes(k.c_in(), k.c_out);
            assert!(b * 3 <= 228 * 1024, "{}: {b} B", k.base);
            assert_eq!(k.c_in() % ffma_chunk(k.c_in()), 0);
            if k.mma {
                assert!(k.c_out == 8 || k.c_out == 4);
                assert!(
                    k.inputs[0] == 8 && k.c_in() <= 16
                        || k.inputs.iter().all(|&c| c == 4) && k.c_in() <= 8
                        || k.inputs == [1]
                );
                assert!(mma_smem_bytes(k.c_in()) * 2 <= 228 * 1024);
            }
        }
        assert_eq!(ffma_smem_bytes(16, 8), (16 * 27 * 8 + 4 * 2280) * 4);
        assert_eq!(mma_smem_bytes(16), 1801 * 48);
    }

    #[test]
    fn table_matches_layer_specs() {
        for k in CONV_KERNELS.iter() {
            let spec = k.layer.spec();
            assert_eq!(spec.c_in, k.c_in(), "{}", spec.name);
            assert_eq!(spec.c_out, k.c_out, "{}", spec.name);
        }
        assert_eq!(kernel_names(Precision::F16, true).len(), 16);
        assert!(kernel_names(Precision::F16, true)
            .iter()
            .any(|(_, n)| n == "h3_conv3_y_mma_f16"));
        assert!(kernel_names(Precision::Bf16, true)
            .iter()
            .any(|(_, n)| n == "h2_fp_conv2_dv_mma_bf16"));
        assert!(kernel_names(Precision::F32, true)
            .iter()
            .all(|(_, n)| !n.contains("mma")));
        assert!(kernel_names(Precision::Bf16, false)
            .iter()
            .all(|(_, n)| !n.contains("mma")));
        // with tensor cores on, every conv runs on them
        assert!(CONV_KERNELS.iter().all(|k| k.mma));
    }

    #[test]
    fn every_kernel_name_is_in_its_module() {
        use crate::backend::cuda::kernels::module;
        let io = module(IO_MODULE).expect("io_half embedded");
        for name in IO_KERNELS {
            assert!(
                io.source.contains(&format!(" {name}(")),
                "{name} not in kernels/io_half.cu"
            );
            if let Some(ptx) = io.ptx {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{name} not in the PTX of io_half"
                );
            }
        }
        for (p, tc) in MODES {
            for (m, name) in kernel_names(p, tc) {
                let km = module(m).unwrap_or_else(|| panic!("module {m} not embedded"));
                assert!(
                    km.source.contains(&format!("{name}(")) || km.source.contains(&format!("({name},")),
                    "{name} not in kernels/{m}.cu"
                );
                if let Some(ptx) = km.ptx {
                    assert!(
                        ptx.contains(&format!(".entry {name}(")),
                        "{name} not in the PTX of kernels/{m}.cu"
                    );
                }
            }
        }
    }

    /// The values of the `constexpr int` constants (and `#define`s of one number) of a
    /// kernel source, top-level lines only: integer expressions of numbers, earlier
    /// names, + − * / and parentheses.
    fn cuda_constants(src: &str) -> std::collections::HashMap<String, i64> {
        use std::collections::HashMap;
        fn eval(tokens: &[String], pos: &mut usize, env: &HashMap<String, i64>) -> i64 {
            let mut v = term(tokens, pos, env);
            while *pos < tokens.len() && (tokens[*pos] == "+" || tokens[*pos] == "-") {
                let op = tokens[*pos].clone();
                *pos += 1;
                let r = term(tokens, pos, env);
                v = if op == "+" { v + r } else { v - r };
            }
            v
        }
        fn term(tokens: &[String], pos: &mut usize, env: &HashMap<String, i64>) -> i64 {
            let mut v = atom(tokens, pos, env);
            while *pos < tokens.len() && (tokens[*pos] == "*" || tokens[*pos] == "/") {
                let op = tokens[*pos].clone();
                *pos += 1;
                let r = atom(tokens, pos, env);
                v = if op == "*" { v * r } else { v / r };
            }
            v
        }
        fn atom(tokens: &[String], pos: &mut usize, env: &HashMap<String, i64>) -> i64 {
            let t = tokens[*pos].clone();
            *pos += 1;
            if t == "(" {
                let v = eval(tokens, pos, env);
                assert_eq!(tokens[*pos], ")");
                *pos += 1;
                return v;
            }
            t.parse()
                .unwrap_or_else(|_| *env.get(&t).unwrap_or_else(|| panic!("unknown name {t}")))
        }
        let tokenize = |e: &str| -> Vec<String> {
            let mut out = Vec::new();
            let mut cur = String::new();
            for ch in e.chars() {
                if ch.is_alphanumeric() || ch == '_' {
                    cur.push(ch);
                } else {
                    if !cur.is_empty() {
                        out.push(std::mem::take(&mut cur));
                    }
                    if !ch.is_whitespace() {
                        out.push(ch.to_string());
                    }
                }
            }
            if !cur.is_empty() {
                out.push(cur);
            }
            out
        };
        let mut env = HashMap::new();
        for line in src.lines() {
            // top-level lines only (the constants of a kernel body are indented)
            let code = line.split("//").next().unwrap().trim_end();
            if let Some(rest) = code.strip_prefix("#define ") {
                let mut it = rest.split_whitespace();
                if let (Some(name), Some(v), None) = (it.next(), it.next(), it.next()) {
                    if let Ok(v) = v.parse::<i64>() {
                        env.insert(name.to_string(), v);
                    }
                }
            } else if let Some(rest) = code.strip_prefix("constexpr int ") {
                for def in rest.trim_end_matches(';').split(',') {
                    let (name, e) = def.split_once('=').expect("constexpr int NAME = value");
                    let tokens = tokenize(e);
                    let mut pos = 0;
                    let v = eval(&tokens, &mut pos, &env);
                    assert_eq!(pos, tokens.len(), "cannot read {def}");
                    env.insert(name.trim().to_string(), v);
                }
            }
        }
        env
    }

    fn kernel_source(file: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("kernels")
            .join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The host's tile geometry (one copy, here) equals the constants of the kernel
    /// sources that use it: conv3_tile.cuh (the one FP32-core tile of inference and
    /// training), conv3_mma.cuh (the tensor-core tile).
    #[test]
    fn tile_geometry_matches_the_kernel_sources() {
        let file = "conv3_tile.cuh";
        let k = cuda_constants(&kernel_source(file));
        let tile = [k["TZ"], k["TY"], k["TX"]].map(|v| v as usize);
        assert_eq!(tile, FFMA_TILE, "{file}: tile (z, y, x)");
        assert_eq!(k["THREADS"], FFMA_THREADS as i64, "{file}: threads");
        assert_eq!(k["RS"] as usize, FFMA_RS, "{file}: smem row stride");
        assert_eq!(k["CS"] as usize, FFMA_CS, "{file}: smem channel stride");
        assert_eq!(k["TILE"] as usize, FFMA_TILE_VOXELS, "{file}: voxels a tile");
        let common = cuda_constants(&kernel_source("train_common.cuh"));
        assert_eq!(
            common["RLN_TRAIN_THREADS"],
            super::super::train_launch::THREADS as i64,
            "train_common.cuh: threads of the training kernels"
        );
        let k = cuda_constants(&kernel_source("conv3_mma.cuh"));
        let tile = [k["TZ"], k["TY"], k["TX"]].map(|v| v as usize);
        assert_eq!(tile, MMA_TILE, "conv3_mma.cuh: tile (z, y, x)");
        assert_eq!(k["THREADS"], MMA_THREADS as i64, "conv3_mma.cuh: threads");
        assert_eq!(k["NVOX"] as usize, MMA_NVOX, "conv3_mma.cuh: smem voxels");
        // and the reader itself
        let k = cuda_constants("#define A 3\nconstexpr int B = (A + 1) * 2 - 6 / 3, C = B;");
        assert_eq!((k["A"], k["B"], k["C"]), (3, 6, 6));
    }

    /// Every (tap, input channel) of a layout appears in exactly one K row, and the X1
    /// and P4 rows sit where the smem layouts put them (k-half h of chunk c covers
    /// (kz, ky) = 2c + h resp. taps 2h, 2h + 1 of (kz, ky) = c).
    #[test]
    fn every_weight_has_one_k_row() {
        for cin in [1, 4, 8, 10, 16] {
            let mut seen = vec![0; 27 * cin];
            for chunk in 0..mma_chunks(cin) {
                for k in 0..16 {
                    if let Some((tap, ci)) = mma_k_row(cin, chunk, k) {
                        seen[tap * cin + ci] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "C_in {cin}: {seen:?}");
        }
        assert_eq!(mma_k_row(1, 2, 9), Some((3 * 5 + 1, 0)));
        assert_eq!(mma_k_row(1, 4, 8), None);
        assert_eq!(mma_k_row(4, 3, 5), Some((3 * 3 + 1, 1)));
        assert_eq!(mma_k_row(4, 3, 9), Some((3 * 3 + 2, 1)));
        assert_eq!(mma_k_row(4, 3, 12), None);
    }

    #[test]
    fn grids_cover_the_volume() {
        assert_eq!(tiled_grid(FFMA_TILE, 2, 5, 9, 33).unwrap(), (2, 2, 4));
        assert_eq!(tiled_grid(MMA_TILE, 1, 256, 256, 256).unwrap(), (16, 32, 32));
        assert!(tiled_grid(FFMA_TILE, 1, 4 * 70_000, 8, 8).is_err());
    }
}
