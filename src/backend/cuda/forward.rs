//! The forward pass of rln-spec §3 on the device: the model's weights folded and
//! uploaded once, a workspace of activation buffers reused across tiles (grown when a
//! larger tile arrives), and the 16 launches, which read like the spec. Allocations,
//! copies and launches go through the CUDA runtime ([`super::runtime::Runtime`]), so the
//! same code runs on the CPU emulation of the kernels in the unit tests.

use super::device::CudaDevice;
use super::launch::{self, conv_kernel, Epi, KernelArgs, CONV_KERNELS};
use super::runtime::{DevMem, DevTensor, Launch, Params, Runtime};
use super::twin::StageOut;
use super::weights;
use super::{CudaOptions, Precision};
use crate::backend::cpu::pointwise;
use crate::error::{Error, Result};
use crate::model::{Model, L};
use crate::tensor::{Shape, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// One conv layer on the device.
struct ConvDev {
    kernel: String,
    tile: [usize; 3],
    threads: u32,
    smem: usize,
    w: DevMem,
    bias: DevMem,
    post: (f32, f32),
}

/// Named activation buffers, each grown on demand and otherwise reused (the caching
/// allocator of the tiles).
#[derive(Default)]
struct Workspace {
    slots: HashMap<&'static str, DevMem>,
}

impl Workspace {
    fn get(&mut self, rt: &Arc<Runtime>, name: &'static str, bytes: usize) -> Result<u64> {
        if let Some(b) = self.slots.get(name) {
            if b.bytes() >= bytes {
                return Ok(b.ptr());
            }
            // queued work (on any stream: the predictor's copies) may still use the old buffer
            rt.synchronize_device()?;
            self.slots.remove(name);
        }
        let b = rt.alloc(bytes)?;
        // the allocation is ordered on the compute stream; the predictor's copy streams
        // may use it next (growing is rare: once per larger tile)
        rt.synchronize()?;
        let p = b.ptr();
        self.slots.insert(name, b);
        Ok(p)
    }
    fn bytes(&self) -> usize {
        self.slots.values().map(|b| b.bytes()).sum()
    }
}

/// Outputs of a host-to-host forward pass, cropped to the input size.
pub struct Outputs {
    pub prediction: Tensor<f32>,
    pub e1_raw: Option<Tensor<f32>>,
    pub e2_raw: Option<Tensor<f32>>,
}

/// The network bound to a device.
pub struct CudaNet {
    rt: Arc<Runtime>,
    pub opts: CudaOptions,
    convs: HashMap<usize, ConvDev>,
    up_kernel: String,
    up_w: DevMem,
    up_b: DevMem,
    div_eps: f32,
    ws: Workspace,
}

/// Device memory per voxel of a (padded) tile: the workspace of [`CudaNet::forward_device`]
/// (full resolution: two 8-channel buffers, E1, dv2, E2, x, y; half resolution: xd, a1,
/// a2, dv1, b1, b2, b3) plus a second input/output pair for streaming.
pub fn workspace_bytes_per_voxel(p: Precision) -> usize {
    let s = p.bytes();
    let full = 16 * s + 5 * 4;
    let half_x8 = 2 * 4 + 32 * s; // per 8 full-resolution voxels
    full + half_x8.div_ceil(8) + 2 * 4
}

impl CudaNet {
    /// Folds and uploads the model's weights. The model must be single-view (one input
    /// channel); dual-view "concat" models are not supported on the GPU yet.
    pub fn new(dev: Arc<CudaDevice>, model: &Model<f32>, opts: CudaOptions) -> Result<CudaNet> {
        Self::on_runtime(Runtime::cuda(dev, opts.sync_each_launch, false)?, model, opts)
    }

    /// As [`CudaNet::new`], on a runtime (the CPU emulation of the unit tests, or a device).
    pub fn on_runtime(rt: Arc<Runtime>, model: &Model<f32>, opts: CudaOptions) -> Result<CudaNet> {
        if model.config.variant.input_channels() != 1 {
            return Err(Error::invalid(format!(
                "the CUDA backend runs single-channel models; this model ({:?}) takes {} input channels: use --device cpu",
                model.config.variant,
                model.config.variant.input_channels()
            )));
        }
        if !model.params.all_finite() {
            return Err(Error::Model("the model holds non-finite weights".into()));
        }
        let mut convs = HashMap::new();
        for k in CONV_KERNELS.iter() {
            let folded = weights::fold_conv(model, k.layer);
            let mma = k.uses_mma(opts.precision, opts.tensor_cores);
            let name = k.name(opts.precision, opts.tensor_cores);
            let what = format!("weights of {}", k.layer.spec().name);
            let (w, tile, threads, smem) = if mma {
                (
                    upload(&rt, &weights::pack_mma_b(&folded, opts.precision), &what)?,
                    launch::MMA_TILE,
                    launch::MMA_THREADS,
                    launch::mma_smem_bytes(k.c_in()),
                )
            } else {
                (
                    upload(&rt, &weights::ffma_layout(&folded), &what)?,
                    launch::FFMA_TILE,
                    launch::FFMA_THREADS,
                    launch::ffma_smem_bytes(k.c_in(), k.c_out),
                )
            };
            let bias = upload(&rt, &folded.bias_f32(), &what)?;
            let post = k.post.map(|l| weights::post_bn(model, l)).unwrap_or((1.0, 0.0));
            convs.insert(
                k.layer as usize,
                ConvDev {
                    kernel: name,
                    tile,
                    threads,
                    smem,
                    w,
                    bias,
                    post,
                },
            );
        }
        let (uw, ub) = weights::fold_up(model);
        let up_w = upload(&rt, &uw, "weights of h1.bp.up")?;
        let up_b = upload(&rt, &ub, "weights of h1.bp.up")?;
        let up_kernel = launch::up_kernel(opts.precision);
        Ok(CudaNet {
            rt,
            opts,
            convs,
            up_kernel,
            up_w,
            up_b,
            div_eps: model.config.div_eps as f32,
            ws: Workspace::default(),
        })
    }

    /// The runtime every allocation, copy and launch of this network goes through.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }

    /// The CUDA device (None on the emulation of the unit tests).
    pub fn device(&self) -> Option<&Arc<CudaDevice>> {
        self.rt.device()
    }

    fn store_bytes(&self) -> usize {
        self.opts.precision.bytes()
    }

    /// Bytes the workspace holds now.
    pub fn workspace_bytes(&self) -> usize {
        self.ws.bytes()
    }

    /// Device buffers for one streaming slot's input and output of `voxels` voxels.
    pub fn io_buffers(&mut self, slot: usize, voxels: usize) -> Result<(u64, u64)> {
        let (xn, yn) = if slot == 0 { ("x0", "y0") } else { ("x1", "y1") };
        Ok((
            self.ws.get(&self.rt, xn, voxels * 4)?,
            self.ws.get(&self.rt, yn, voxels * 4)?,
        ))
    }

    /// Fills every workspace buffer with 0xFF bytes (NaN in f32 and f16): a later pass
    /// whose kernels read an element nothing wrote then yields NaN (tests).
    pub fn poison_workspace(&mut self) -> Result<()> {
        for b in self.ws.slots.values() {
            self.rt.memset(b.ptr(), 0xFF, b.bytes())?;
        }
        self.rt.synchronize()
    }

    /// Starts recording one event pair per launch (see [`CudaNet::take_profile`]).
    pub fn start_profile(&mut self) {
        self.rt.start_profile()
    }

    /// Waits for the profiled launches and returns (kernel, milliseconds) in launch order.
    pub fn take_profile(&mut self) -> Result<Vec<(String, f64)>> {
        self.rt.take_profile()
    }

    fn launch(&mut self, name: &str, grid: (u32, u32, u32), block: u32, smem: usize, args: &KernelArgs) -> Result<()> {
        self.rt.launch(&Launch {
            name,
            grid,
            block,
            smem,
            params: Params::Infer(args),
        })
    }

    /// One conv kernel: `inputs` concatenated, `aux` the epilogue's one-channel operand,
    /// `raw` where E_raw goes (update stages), all of batch/volume `dims` = [n, d, h, w].
    fn conv(&mut self, l: L, inputs: &[u64], aux: u64, out: u64, raw: u64, dims: [usize; 4]) -> Result<()> {
        let c = &self.convs[&(l as usize)];
        let [n, d, h, w] = dims;
        let args = KernelArgs {
            in0: inputs[0],
            in1: inputs.get(1).copied().unwrap_or(0),
            in2: inputs.get(2).copied().unwrap_or(0),
            wt: c.w.ptr(),
            bias: c.bias.ptr(),
            aux,
            out,
            out_raw: raw,
            n: n as i32,
            d: d as i32,
            h: h as i32,
            w: w as i32,
            post_scale: c.post.0,
            post_shift: c.post.1,
            eps: self.div_eps,
            pad_: 0,
        };
        let grid = launch::tiled_grid(c.tile, n, d, h, w)?;
        let (name, smem, threads) = (c.kernel.clone(), c.smem, c.threads);
        self.launch(&name, grid, threads, smem, &args)
    }

    /// u = sp(BN7(up2(b3))); `half` = [n, d, h, w] of b3.
    fn up(&mut self, b3: u64, u: u64, half: [usize; 4]) -> Result<()> {
        let [n, d, h, w] = half;
        let args = KernelArgs {
            in0: b3,
            wt: self.up_w.ptr(),
            bias: self.up_b.ptr(),
            out: u,
            n: n as i32,
            d: d as i32,
            h: h as i32,
            w: w as i32,
            ..Default::default()
        };
        let name = self.up_kernel.clone();
        let grid = (launch::grid_1d(n * d * h * w), 1, 1);
        self.launch(&name, grid, launch::ELEMENTWISE_THREADS, 0, &args)
    }

    /// xd = avgpool2(x); `half` = [n, d, h, w] of xd.
    fn pool(&mut self, x: u64, xd: u64, half: [usize; 4]) -> Result<()> {
        let [n, d, h, w] = half;
        let args = KernelArgs {
            in0: x,
            out: xd,
            n: n as i32,
            d: d as i32,
            h: h as i32,
            w: w as i32,
            ..Default::default()
        };
        self.launch(
            launch::POOL_KERNEL,
            (launch::grid_1d(n * d * h * w), 1, 1),
            launch::ELEMENTWISE_THREADS,
            0,
            &args,
        )
    }

    /// Enqueues the forward pass on the compute stream: `x` (f32, N×D×H×W, even sizes,
    /// normalized) → `y`; with `raw`, also E1r and E2r. Nothing is synchronized.
    pub fn forward_device(&mut self, x: u64, y: u64, dims: [usize; 4], raw: Option<(u64, u64)>) -> Result<()> {
        let [n, d, h, w] = dims;
        launch::check_dims(n, d, h, w)?;
        if d % 2 + h % 2 + w % 2 != 0 {
            return Err(Error::invalid(format!(
                "forward_device needs even sizes, got {d}×{h}×{w} (pad with pad_even)"
            )));
        }
        let rt = self.rt.clone();
        let s = self.store_bytes();
        let half = [n, d / 2, h / 2, w / 2];
        let (hv, fv) = (n * half[1] * half[2] * half[3], n * d * h * w);
        let mut get = |name: &'static str, bytes: usize| self.ws.get(&rt, name, bytes);
        // half resolution
        let xd = get("xd", hv * 4)?;
        let a1 = get("a1", hv * 4 * s)?;
        let a2 = get("a2", hv * 4 * s)?;
        let dv1 = get("dv1", hv * 4)?;
        let b1 = get("b1", hv * 8 * s)?;
        let b2 = get("b2", hv * 8 * s)?;
        let b3 = get("b3", hv * 8 * s)?;
        // full resolution; m8a holds u, then c1, then d1, then f1 (each dead before the next)
        let m8a = get("m8a", fv * 8 * s)?;
        let f2 = get("m8b", fv * 8 * s)?;
        let e1 = get("e1", fv * 4)?;
        let dv2 = get("dv2", fv * 4)?;
        let e2 = get("e2", fv * 4)?;
        let (e1r, e2r) = raw.unwrap_or((0, 0));

        // down-scale part (FP1, DV1, BP1 at half resolution)
        self.pool(x, xd, half)?;
        self.conv(L::H1FpConv1, &[xd], 0, a1, 0, half)?;
        self.conv(L::H1FpConv2, &[a1], 0, a2, 0, half)?;
        self.conv(L::H1FpConv3, &[a1, a2], xd, dv1, 0, half)?; // dv1 = BN3(xd / (cm(fp1) + ε))
        self.conv(L::H1BpConv1, &[dv1], 0, b1, 0, half)?;
        self.conv(L::H1BpConv2, &[b1], 0, b2, 0, half)?;
        self.conv(L::H1BpConv3, &[b2, b1], 0, b3, 0, half)?;
        let u = m8a;
        self.up(b3, u, half)?;
        self.conv(L::H1BpConv4, &[u], x, e1, e1r, dims)?; // E1 = sp(BN9(x · cm(bp1)))

        // original-scale part (FP2, DV2, BP2)
        let c1 = m8a;
        self.conv(L::H2FpConv1, &[x], 0, c1, 0, dims)?;
        self.conv(L::H2FpConv2, &[c1], x, dv2, 0, dims)?; // dv2 = BN12(x / (cm(fp2) + ε))
        let d1 = m8a;
        self.conv(L::H2BpConv1, &[dv2], 0, d1, 0, dims)?;
        self.conv(L::H2BpConv2, &[d1], e1, e2, e2r, dims)?; // E2 = sp(BN15(E1 · cm(bp2)))

        // merge part
        let f1 = m8a;
        self.conv(L::H3Conv1, &[e2], 0, f1, 0, dims)?;
        self.conv(L::H3Conv2, &[f1, e2, e1], 0, f2, 0, dims)?;
        self.conv(L::H3Conv3, &[f1, f2], 0, y, 0, dims)?; // y = cm(f3)
        Ok(())
    }

    /// The forward pass on a host tensor (N×1×D×H×W, any sizes: odd ones are mirror-padded
    /// to even like backend::cpu and the outputs cropped back). Synchronous.
    pub fn predict_host(&mut self, x: &Tensor<f32>, want_raw: bool) -> Result<Outputs> {
        if x.shape.c != 1 {
            return Err(Error::Shape(format!(
                "the CUDA network takes one input channel; the tile is {}",
                x.shape
            )));
        }
        let padded = pointwise::pad_even(x);
        let ps = padded.shape;
        let vox = ps.len();
        let rt = self.rt.clone();
        let (xb, yb) = self.io_buffers(0, vox)?;
        let raw = if want_raw {
            Some((self.ws.get(&rt, "e1r", vox * 4)?, self.ws.get(&rt, "e2r", vox * 4)?))
        } else {
            None
        };
        rt.htod(xb, &padded.data)
            .map_err(|e| e.context("copying the input tile to the device"))?;
        self.forward_device(xb, yb, [ps.n, ps.d, ps.h, ps.w], raw)?;
        let download = |p: u64, what: &str| -> Result<Tensor<f32>> {
            let mut t = Tensor::zeros(ps);
            rt.dtoh(&mut t.data, p)
                .map_err(|e| e.context(format!("running the forward pass and copying {what} back")))?;
            Ok(pointwise::crop(&t, x.shape))
        };
        let prediction = download(yb, "the prediction")?;
        let (e1_raw, e2_raw) = match raw {
            Some((a, b)) => (Some(download(a, "E1r")?), Some(download(b, "E2r")?)),
            None => (None, None),
        };
        Ok(Outputs {
            prediction,
            e1_raw,
            e2_raw,
        })
    }

    // ---- single kernels, for the differential tests against backend::cuda::twin ----

    /// Uploads a host tensor in the device layout: channels-last, the storage type for
    /// several channels, f32 for one.
    /// The storage type of an activation of `c` channels: f32 for one channel, else the
    /// network's (kernels/rln_common.cuh `RlnStorage`).
    fn storage(&self, c: usize) -> Precision {
        if c > 1 {
            self.opts.precision
        } else {
            Precision::F32
        }
    }

    fn upload_activation(&mut self, t: &Tensor<f32>) -> Result<DevTensor> {
        self.rt.upload_tensor(t, self.storage(t.shape.c))
    }

    fn download_activation(&self, t: &DevTensor) -> Result<Tensor<f32>> {
        self.rt
            .download_tensor(t)
            .map_err(|e| e.context("running a test kernel and copying its output"))
    }

    /// An output tensor poisoned with 0xFF bytes (NaN in f32 and f16), so that an
    /// element the kernel fails to write shows up as NaN.
    fn poisoned(&self, shape: Shape) -> Result<DevTensor> {
        let t = self.rt.tensor(shape, self.storage(shape.c))?;
        self.rt.memset(t.ptr(), 0xFF, shape.len() * t.dtype().bytes())?;
        Ok(t)
    }

    /// Runs the conv kernel of layer `l` alone on host tensors (N×C×D×H×W, any size):
    /// the GPU side of the per-kernel differential tests ([`super::twin::conv_stage`]).
    pub fn run_conv_stage(&mut self, l: L, inputs: &[&Tensor<f32>], aux: Option<&Tensor<f32>>) -> Result<StageOut> {
        let k = conv_kernel(l);
        let s0 = inputs[0].shape;
        let chans: Vec<usize> = inputs.iter().map(|t| t.shape.c).collect();
        if chans != k.inputs || inputs.iter().any(|t| t.shape.with_c(1) != s0.with_c(1)) {
            return Err(Error::Shape(format!(
                "{} takes inputs of channels {:?} and one size; got {:?}",
                l.spec().name,
                k.inputs,
                chans
            )));
        }
        let bufs = inputs
            .iter()
            .map(|t| self.upload_activation(t))
            .collect::<Result<Vec<_>>>()?;
        let aux_buf = aux.map(|a| self.upload_activation(a)).transpose()?;
        let out_c = if k.epi == Epi::Sp { k.c_out } else { 1 };
        let out_shape = s0.with_c(out_c);
        let out = self.poisoned(out_shape)?;
        let raw = matches!(k.epi, Epi::Update | Epi::UpdatePlus1)
            .then(|| self.poisoned(s0.with_c(1)))
            .transpose()?;
        let ptrs: Vec<u64> = bufs.iter().map(|b| b.ptr()).collect();
        self.conv(
            l,
            &ptrs,
            aux_buf.as_ref().map_or(0, |b| b.ptr()),
            out.ptr(),
            raw.as_ref().map_or(0, |b| b.ptr()),
            [s0.n, s0.d, s0.h, s0.w],
        )?;
        let out_t = self.download_activation(&out)?;
        let raw_t = raw.map(|r| self.download_activation(&r)).transpose()?;
        Ok(StageOut { out: out_t, raw: raw_t })
    }

    /// Runs the up2 kernel alone: b3 (N×8×d×h×w) → u (N×4×2d×2h×2w).
    pub fn run_up_stage(&mut self, b3: &Tensor<f32>) -> Result<Tensor<f32>> {
        let s = b3.shape;
        let ib = self.upload_activation(b3)?;
        let os = Shape::new(s.n, 4, 2 * s.d, 2 * s.h, 2 * s.w);
        let out = self.poisoned(os)?;
        self.up(ib.ptr(), out.ptr(), [s.n, s.d, s.h, s.w])?;
        self.download_activation(&out)
    }

    /// Runs the avgpool2 kernel alone: x (N×1×D×H×W, even) → xd.
    pub fn run_pool_stage(&mut self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let s = x.shape;
        let ib = self.upload_activation(x)?;
        let os = Shape::new(s.n, 1, s.d / 2, s.h / 2, s.w / 2);
        let out = self.poisoned(os)?;
        self.pool(ib.ptr(), out.ptr(), [os.n, os.d, os.h, os.w])?;
        self.download_activation(&out)
    }
}

/// Copies `data` into a new device allocation and waits for the copy (weights, test inputs).
fn upload<T: bytemuck::Pod>(rt: &Arc<Runtime>, data: &[T], what: &str) -> Result<DevMem> {
    let m = rt.upload(data).map_err(|e| e.context(format!("uploading {what}")))?;
    rt.synchronize().map_err(|e| e.context(format!("uploading {what}")))?;
    Ok(m)
}
