//! The inference kernels run on the CPU (test-only), so that [`super::CudaInferBackend`] runs its
//! whole host side without a GPU: an [`Exec`] whose memory and training kernels are those
//! of [`EmuExec`] (emulate_train.rs) and whose inference launches run the line-by-line
//! conv tile emulations of emulate.rs (FP32-core and tensor-core) and transcriptions of
//! avgpool2 and up2 (kernels/pool.cuh, kernels/up2.cuh), on host memory that plays device memory.
//!
//! Every launch is checked against what launch.rs says (grid, block, shared memory) and
//! the device buffers are read and written in the kernels' storage types (multi-channel
//! activations as f16 or bf16 bits in the 16-bit networks, weights in the layout the kernel reads:
//! `ffma_layout` f32 or `pack_mma_b` fp16 fragments), so a host-side mistake in
//! infer.rs or weights.rs shows up as a wrong output or a failed check. What this
//! cannot catch: a difference between the emulations and the .cu lines (and the f16
//! kernels' fast softplus, ~1e-7 absolute, is emulated by the exact one).

use super::emulate::{conv3_ffma, conv3_mma, EmuArgs};
use super::emulate_train::EmuExec;
use super::launch::*;
use super::runtime::Exec;
use super::train_launch::TrainArgs;
use super::weights::FoldedConv;
use super::Precision;
use crate::error::{Error, Result};
use crate::model::L;
use crate::real::Real;

/// The emulated device of inference and training.
#[derive(Default)]
pub struct EmuDevice {
    /// Memory and the training kernels.
    pub mem: EmuExec,
}

impl EmuDevice {
    fn read<T: bytemuck::Pod>(&self, ptr: u64, len: usize) -> Vec<T> {
        assert_ne!(ptr, 0, "an emulated kernel reads a null pointer");
        let mut v = vec![T::zeroed(); len];
        self.mem
            .dtoh(bytemuck::cast_slice_mut(&mut v), ptr)
            .expect("emulated copy");
        v
    }

    fn write<T: bytemuck::Pod>(&self, ptr: u64, v: &[T]) {
        assert_ne!(ptr, 0, "an emulated kernel writes a null pointer");
        self.mem.htod(ptr, bytemuck::cast_slice(v)).expect("emulated copy");
    }

    /// An activation of `c` channels: 16-bit patterns of storage `p` when several
    /// channels and `p` is f16 or bf16, else f32.
    fn read_act(&self, ptr: u64, len: usize, c: usize, p: Precision) -> Vec<f32> {
        if c > 1 && p != Precision::F32 {
            let h: Vec<u16> = self.read(ptr, len);
            h.iter().map(|&b| p.from_bits16(b)).collect()
        } else {
            self.read(ptr, len)
        }
    }

    fn write_act(&self, ptr: u64, v: &[f32], c: usize, p: Precision) {
        if c > 1 && p != Precision::F32 {
            // cvt.rn.f16.f32 / cvt.rn.bf16.f32: round to nearest even, as half's from_f32
            let h: Vec<u16> = v.iter().map(|&x| p.bits16(x)).collect();
            self.write(ptr, &h);
        } else {
            self.write(ptr, v);
        }
    }

    /// One conv kernel of the table: inputs, aux, weights and bias read from the device
    /// in the kernel's formats, the tile emulation, the outputs written back.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &self,
        k: &ConvKernel,
        prec: Precision,
        mma: bool,
        name: &str,
        grid: (u32, u32, u32),
        smem: usize,
        a: &KernelArgs,
    ) -> Result<()> {
        let (n, d, h, w) = (a.n as usize, a.d as usize, a.h as usize, a.w as usize);
        let (cin, cout) = (k.c_in(), k.c_out);
        let tile = if mma { MMA_TILE } else { FFMA_TILE };
        assert_eq!(grid, tiled_grid(tile, n, d, h, w)?, "{name}: grid");
        let want_smem = if mma {
            mma_smem_bytes(cin)
        } else {
            ffma_smem_bytes(cin, cout)
        };
        assert_eq!(smem, want_smem, "{name}: shared memory");
        let vox = n * d * h * w;
        let ptrs = [a.in0, a.in1, a.in2];
        for (i, &p) in ptrs.iter().enumerate().skip(k.inputs.len()) {
            assert_eq!(p, 0, "{name}: input {i} is set but the kernel has {}", k.inputs.len());
        }
        let ins: Vec<Vec<f32>> = k
            .inputs
            .iter()
            .enumerate()
            .map(|(i, &c)| self.read_act(ptrs[i], vox * c, c, prec))
            .collect();
        let aux = k.post.map(|_| self.read::<f32>(a.aux, vox));
        let bias: Vec<f64> = self.read::<f32>(a.bias, cout).iter().map(|&b| b as f64).collect();
        let weight = if mma {
            unpack_mma_b(&self.read::<u32>(a.wt, mma_chunks(cin) * 64), cin, cout, prec)
        } else {
            unpack_ffma(&self.read::<f32>(a.wt, cin * 27 * cout), cin, cout)
        };
        let f = FoldedConv {
            c_in: cin,
            c_out: cout,
            weight,
            bias,
        };
        let ea = EmuArgs {
            inputs: ins.iter().zip(k.inputs).map(|(v, &c)| (v.as_slice(), c)).collect(),
            aux: aux.as_deref(),
            n,
            d,
            h,
            w,
            post: (a.post_scale, a.post_shift),
            eps: a.eps,
            c_out: cout,
            epi: k.epi,
        };
        let o = if mma {
            conv3_mma(&ea, &f, prec)
        } else {
            conv3_ffma(&ea, &f)
        };
        let oc = if k.epi == Epi::Sp { cout } else { 1 };
        self.write_act(a.out, &o.out, oc, prec);
        if matches!(k.epi, Epi::Update | Epi::UpdatePlus1) && a.out_raw != 0 {
            self.write(a.out_raw, &o.raw);
        }
        Ok(())
    }

    /// up2_sp (up2.cuh): n, d, h, w the input (half) size.
    fn up(&self, prec: Precision, grid: (u32, u32, u32), smem: usize, a: &KernelArgs) {
        let spec = L::H1BpUp.spec();
        let (ci, co) = (spec.c_in, spec.c_out);
        let (n, d, h, w) = (a.n as usize, a.d as usize, a.h as usize, a.w as usize);
        let total = n * d * h * w;
        assert_eq!(grid, (grid_1d(total), 1, 1), "up2: grid");
        assert_eq!(smem, 0, "up2: shared memory");
        let t = self.read_act(a.in0, total * ci, ci, prec);
        let wt: Vec<f32> = self.read(a.wt, ci * co * 8);
        let b: Vec<f32> = self.read(a.bias, co);
        let mut out = vec![f32::NAN; total * 8 * co];
        let (d2, h2, w2) = (2 * d, 2 * h, 2 * w);
        for i in 0..total {
            let k = i % w;
            let j = (i / w) % h;
            let z = (i / (w * h)) % d;
            let nn = i / (w * h * d);
            for pqr in 0..8 {
                let (p, q, r) = (pqr >> 2, (pqr >> 1) & 1, pqr & 1);
                let ov = ((nn * d2 + 2 * z + p) * h2 + 2 * j + q) * w2 + 2 * k + r;
                for o in 0..co {
                    let mut s = 0.0f32;
                    for c in 0..ci {
                        s = t[i * ci + c].mul_add(wt[(c * co + o) * 8 + pqr], s);
                    }
                    out[ov * co + o] = (s + b[o]).softplus();
                }
            }
        }
        self.write_act(a.out, &out, co, prec);
    }

    /// avgpool2 (pool.cuh): n, d, h, w the output (half) size.
    fn pool(&self, grid: (u32, u32, u32), smem: usize, a: &KernelArgs) {
        let (n, d, h, w) = (a.n as usize, a.d as usize, a.h as usize, a.w as usize);
        let total = n * d * h * w;
        assert_eq!(grid, (grid_1d(total), 1, 1), "avgpool2: grid");
        assert_eq!(smem, 0, "avgpool2: shared memory");
        let x: Vec<f32> = self.read(a.in0, total * 8);
        let (dd, hh, ww) = (2 * d, 2 * h, 2 * w);
        let mut o = vec![0.0f32; total];
        for (i, out) in o.iter_mut().enumerate() {
            let k = i % w;
            let j = (i / w) % h;
            let z = (i / (w * h)) % d;
            let nn = i / (w * h * d);
            let mut acc = 0.0f32;
            for da in 0..2 {
                for db in 0..2 {
                    let r = ((nn * dd + 2 * z + da) * hh + 2 * j + db) * ww + 2 * k;
                    acc += x[r] + x[r + 1];
                }
            }
            *out = acc * 0.125;
        }
        self.write(a.out, &o);
    }
}

/// The engine layout [co][ci][27] (f64) of weights in the FP32-core layout [ci][27][co].
fn unpack_ffma(sw: &[f32], cin: usize, cout: usize) -> Vec<f64> {
    let mut w = vec![0.0f64; cin * 27 * cout];
    for o in 0..cout {
        for ci in 0..cin {
            for tap in 0..27 {
                w[(o * cin + ci) * 27 + tap] = sw[(ci * 27 + tap) * cout + o] as f64;
            }
        }
    }
    w
}

/// The engine layout of weights packed as mma B fragments of 16-bit type `p` (weights.rs
/// `pack_mma_b`), with a check that every padding element (rows and, for C_out = 4,
/// columns) is zero.
fn unpack_mma_b(words: &[u32], cin: usize, cout: usize, p: Precision) -> Vec<f64> {
    let mut w = vec![0.0f64; cin * 27 * cout];
    for chunk in 0..mma_chunks(cin) {
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for (r, kbase) in [(0, 2 * t), (1, 2 * t + 8)] {
                let word = words[(chunk * 32 + lane) * 2 + r];
                for hi in 0..2 {
                    let v = p.from_bits16((word >> (16 * hi)) as u16) as f64;
                    match mma_k_row(cin, chunk, kbase + hi) {
                        Some((tap, ci)) if g < cout => w[(g * cin + ci) * 27 + tap] = v,
                        _ => assert_eq!(v, 0.0, "padding of the mma B fragments is not zero"),
                    }
                }
            }
        }
    }
    w
}

impl Exec for EmuDevice {
    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.mem.alloc(bytes)
    }
    fn free(&self, ptr: u64) {
        self.mem.free(ptr)
    }
    fn memset(&self, ptr: u64, v: u8, bytes: usize) -> Result<()> {
        self.mem.memset(ptr, v, bytes)
    }
    fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.mem.htod(dst, src)
    }
    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.mem.dtoh(dst, src)
    }
    fn launch(&self, name: &str, grid: (u32, u32, u32), smem: usize, args: &TrainArgs) -> Result<()> {
        self.mem.launch(name, grid, smem, args)
    }
    fn launch_infer(&self, name: &str, grid: (u32, u32, u32), block: u32, smem: usize, a: &KernelArgs) -> Result<()> {
        assert_eq!(block, 256, "{name}: threads per block");
        if name == POOL_KERNEL {
            self.pool(grid, smem, a);
            return Ok(());
        }
        for p in [Precision::F32, Precision::F16, Precision::Bf16] {
            if name == up_kernel(p) {
                self.up(p, grid, smem, a);
                return Ok(());
            }
        }
        for k in CONV_KERNELS.iter() {
            for (p, tc) in MODES {
                if k.name(p, tc) == name {
                    return self.conv(k, p, k.uses_mma(p, tc), name, grid, smem, a);
                }
            }
        }
        Err(Error::Cuda(format!("no emulation of an inference kernel named {name}")))
    }
    /// kernels/io_half.cu: f16 bits ↔ f32, element by element (cvt.rn: round to nearest even).
    fn launch_io(&self, name: &str, grid: (u32, u32, u32), block: u32, a: &super::runtime::IoArgs) -> Result<()> {
        assert_eq!(block, ELEMENTWISE_THREADS, "{name}: threads per block");
        assert!(grid.0 >= 1 && grid.1 == 1 && grid.2 == 1, "{name}: grid {grid:?}");
        let n = a.n as usize;
        match name {
            TO_F32_KERNEL => {
                let h: Vec<u16> = self.read(a.src, n);
                let v: Vec<f32> = h.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect();
                self.write(a.dst, &v);
            }
            TO_F16_KERNEL => {
                let v: Vec<f32> = self.read(a.src, n);
                let h: Vec<u16> = v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect();
                self.write(a.dst, &h);
            }
            _ => return Err(Error::Cuda(format!("no emulation of a conversion kernel named {name}"))),
        }
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        self.mem.synchronize()
    }
}

#[cfg(test)]
mod tests {
    //! The whole emulated network against the CPU f32 network (issue 17's accuracy goal:
    //! ≤ 1e-3 relative L2 with tensor-core fp16 on the shipped model and a realistic
    //! input, and on random weights).
    use super::EmuDevice;
    use crate::backend::cpu::pointwise;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::cuda::runtime::Runtime;
    use crate::backend::cuda::{random_model, CudaInferBackend, CudaOptions};
    use crate::backend::Backend;
    use crate::compare::model_psf;
    use crate::demo::shipped_model;
    use crate::imaging::normalize::normalize_percentile;
    use crate::imaging::synth::{SynthConfig, Synthesizer};
    use crate::model::Model;
    use crate::net::{BnMode, Rln};
    use crate::tensor::{rel_l2, Shape, Tensor};
    use std::sync::Arc;

    /// A synthetic specimen (the phantoms of spec §6 blurred by the shipped model's PSF,
    /// its central 13×21×21 voxels so that a small volume fits, with Poisson and read
    /// noise), normalized at the 0.01/99.9 percentiles as the model was trained:
    /// 20×28×44 voxels (partial tiles of both kernel families).
    fn specimen(model: &Model<f32>) -> Tensor<f32> {
        let (_, psf) = model_psf(model).unwrap();
        let keep = [13, 21, 21];
        let off = [0, 1, 2].map(|i| (psf.dims[i] - keep[i]) / 2);
        let psf = psf.crop(off, keep).unwrap();
        let cfg = SynthConfig {
            size: [20, 28, 44],
            ..SynthConfig::default()
        };
        let (input, _) = Synthesizer::new(&cfg, &psf).unwrap().make_pair(17).unwrap();
        let x = normalize_percentile(&input.data, 0.01, 99.9).unwrap();
        Tensor::from_vec(Shape::new(1, 1, cfg.size[0], cfg.size[1], cfg.size[2]), x).unwrap()
    }

    fn emulated(model: &Model<f32>, x: &Tensor<f32>, opts: CudaOptions) -> Tensor<f32> {
        let rt = Runtime::on_exec(Arc::new(EmuDevice::default()), true);
        let b = CudaInferBackend::on_runtime(rt, model, opts).unwrap();
        let xd = b.from_host(&pointwise::pad_even(x)).unwrap();
        let y = Rln::new(&b, model).infer(&xd, false).unwrap().prediction;
        pointwise::crop(&b.to_host(&y).unwrap(), x.shape.with_c(1))
    }

    /// Tolerances: f16 1e-3 (the goal; one fp16 rounding is 4.9e-4 relative);
    /// bf16 8× that (8 significant bits against 11). Measured values are printed.
    #[test]
    fn emulated_half_networks_match_the_cpu_on_a_synthetic_specimen() {
        let shipped = shipped_model().unwrap();
        let x = specimen(&shipped);
        let cpu = CpuBackend::<f32>::new();
        for (what, model) in [
            ("shipped model", shipped.clone()),
            ("random_model(11)", random_model(11)),
        ] {
            let want = Rln::new(&cpu, &model)
                .forward(&x, BnMode::Running, false)
                .unwrap()
                .prediction;
            assert!(want.all_finite());
            for (opts, tol) in [
                (CudaOptions::f16(), 1e-3),
                (CudaOptions::f16().with_tensor_cores(false), 1e-3),
                (CudaOptions::bf16(), 8e-3),
            ] {
                let got = emulated(&model, &x, opts);
                assert!(got.all_finite(), "{what} {}: non-finite outputs", opts.label());
                let e = rel_l2(&got.data, &want.data);
                println!("{what} {}: rel L2 to the CPU f32 network {e:.2e}", opts.label());
                assert!(e <= tol, "{what} {}: rel L2 {e:e} > {tol:e}", opts.label());
            }
        }
    }
}
