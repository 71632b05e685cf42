//! CUDA inference as a backend: [`CudaInferBackend`] runs the network of `net` (the table
//! of fused stages that `net::Rln::infer` walks) with the fused conv kernels of
//! [`CONV_KERNELS`] (conv + folded batch norm + softplus + the RL division / update /
//! channel mean epilogues in one launch), up2 and avgpool2, on the one CUDA runtime.
//!
//! - Weights are folded (batch norm into the conv, running statistics) and packed once,
//!   when the backend is bound to a model ([`CudaInferBackend::new`]); a stage names its
//!   layer and the backend launches that layer's kernel with its packed weights. The
//!   host weights and folded affine maps a stage carries (for the composed default) are
//!   not read by the fused path.
//! - Tensors are the runtime's [`DevTensor`]s: channels-last; one-channel tensors are
//!   f32, several channels f32 or f16 ([`Precision`], kernels/rln_common.cuh
//!   `RlnStorage`); the network's input is f32 whatever its channels. Every stage output
//!   is allocated from the runtime's stream-ordered pool (no device synchronization), and
//!   `net::Rln::infer` frees each activation after its last reader, so a stream of tiles
//!   reuses the pool's memory from tile to tile.
//! - The stages the fused kernels do not cover (the dual-view model's two-channel first
//!   convs, the channel mean of its input and the pooling of both) run composed of the
//!   f32 training kernels ([`CudaTrainBackend`], the same runtime): f16 inputs widened to
//!   f32 and outputs stored as the next fused kernel reads them (kernels/io_half.cu).
//! - Every other op of [`Backend`] is the training backend's (f32 tensors).

use super::launch::{self, conv_kernel, ConvKernel, Epi, KernelArgs, CONV_KERNELS, TO_F16_KERNEL, TO_F32_KERNEL};
use super::runtime::{DevMem, DevTensor, IoArgs, Launch, Params, Runtime};
use super::train::CudaTrainBackend;
use super::twin::StageOut as HostStageOut;
use super::{weights, CudaDevice, CudaOptions, Precision};
use crate::backend::loss::LossTerms;
use crate::backend::optim::Adam;
use crate::backend::stage::{composed_stage, Node, Stage, StageOp, StageOut};
use crate::backend::{Addend, Backend, BnTrainState, ChannelStats, Epilogue, GradMode};
use crate::error::{Error, Result};
use crate::model::{Model, Variant, L, NUM_LAYERS};
use crate::tensor::{Shape, Tensor};
use std::sync::Arc;

/// One conv layer's fused kernel and its packed weights.
struct ConvDev {
    k: &'static ConvKernel,
    kernel: String,
    tile: [usize; 3],
    threads: u32,
    smem: usize,
    w: DevMem,
    bias: DevMem,
    post: (f32, f32),
}

/// The inference backend: the fused kernels bound to one model, on one runtime.
pub struct CudaInferBackend {
    /// The composed ops (f32 training kernels) on the same runtime.
    train: CudaTrainBackend,
    pub opts: CudaOptions,
    /// The model the weights were folded from (`net::Rln::infer` runs it).
    model: Model<f32>,
    /// Per layer (index `L as usize`): its fused conv kernel.
    convs: Vec<Option<ConvDev>>,
    up_kernel: String,
    up_w: DevMem,
    up_b: DevMem,
    div_eps: f32,
}

/// Device memory per voxel of a (padded) tile that inference holds at its peak: the
/// live activations of `net::Rln::infer` (full resolution: two 8-channel tensors (f1,
/// f2), x, E1, E2, E1r, E2r; half resolution, per 8 voxels: xd, dv1 and four 8-channel
/// tensors), plus the streaming predictor's input/output pair, plus for dual-view
/// models the second input channel and x̄.
pub fn bytes_per_voxel(p: Precision, input_channels: usize) -> usize {
    let s = p.bytes();
    let full = 16 * s + 5 * 4;
    let half_x8 = 2 * 4 + 32 * s; // per 8 full-resolution voxels
    let dual = if input_channels > 1 { 4 * input_channels } else { 0 };
    full + half_x8.div_ceil(8) + 2 * 4 + dual
}

impl CudaInferBackend {
    /// Folds and uploads `model`'s weights on device `dev`.
    pub fn new(dev: Arc<CudaDevice>, model: &Model<f32>, opts: CudaOptions) -> Result<Self> {
        let poison = std::env::var("RLN_CUDA_POISON").is_ok_and(|v| v == "1");
        Self::on_runtime(Runtime::cuda(dev, opts.sync_each_launch, poison)?, model, opts)
    }

    /// As [`CudaInferBackend::new`], on a runtime (a device, or the CPU emulation of the
    /// unit tests).
    pub fn on_runtime(rt: Arc<Runtime>, model: &Model<f32>, opts: CudaOptions) -> Result<Self> {
        if !model.params.all_finite() {
            return Err(Error::Model("the model holds non-finite weights".into()));
        }
        let mut convs: Vec<Option<ConvDev>> = (0..NUM_LAYERS).map(|_| None).collect();
        for k in CONV_KERNELS.iter() {
            if model.config.variant.input_channels() != 1 && k.layer.spec().reads_input {
                // the kernel reads one input channel; the composed stage runs this layer
                continue;
            }
            let folded = weights::fold_conv(model, k.layer);
            let mma = k.uses_mma(opts.precision, opts.tensor_cores);
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
            convs[k.layer as usize] = Some(ConvDev {
                k,
                kernel: k.name(opts.precision, opts.tensor_cores),
                tile,
                threads,
                smem,
                w,
                bias,
                post,
            });
        }
        let (uw, ub) = weights::fold_up(model);
        let up_w = upload(&rt, &uw, "weights of h1.bp.up")?;
        let up_b = upload(&rt, &ub, "weights of h1.bp.up")?;
        let up_kernel = launch::up_kernel(opts.precision);
        Ok(CudaInferBackend {
            train: CudaTrainBackend::on_runtime(rt),
            opts,
            model: model.clone(),
            convs,
            up_kernel,
            up_w,
            up_b,
            div_eps: model.config.div_eps as f32,
        })
    }

    /// The model this backend's weights were folded from.
    pub fn model(&self) -> &Model<f32> {
        &self.model
    }

    /// The runtime every allocation, copy and launch goes through.
    pub fn runtime(&self) -> &Arc<Runtime> {
        self.train.runtime()
    }

    /// The CUDA device (None on the emulation of the unit tests).
    pub fn device(&self) -> Option<&Arc<CudaDevice>> {
        self.runtime().device()
    }

    /// The storage type of an activation of `c` channels: f32 for one channel, else the
    /// network's (kernels/rln_common.cuh `RlnStorage`).
    fn storage(&self, c: usize) -> Precision {
        if c > 1 {
            self.opts.precision
        } else {
            Precision::F32
        }
    }

    /// Starts recording one event pair per launch (see [`Self::take_profile`]).
    pub fn start_profile(&self) {
        self.runtime().start_profile()
    }

    /// Waits for the profiled launches and returns (kernel, milliseconds) in launch order.
    pub fn take_profile(&self) -> Result<Vec<(String, f64)>> {
        self.runtime().take_profile()
    }

    fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, smem: usize, args: &KernelArgs) -> Result<()> {
        self.runtime().launch(&Launch {
            name,
            grid,
            block,
            smem,
            params: Params::Infer(args),
        })
    }

    /// An output tensor of `shape` in the storage the kernels write.
    fn output(&self, shape: Shape) -> Result<DevTensor> {
        self.runtime().tensor(shape, self.storage(shape.c))
    }

    /// One fused conv kernel: `inputs` concatenated, `aux` the epilogue's one-channel
    /// operand, `raw` where E_raw goes (update stages), all of `dims` = [n, d, h, w].
    fn conv(&self, c: &ConvDev, inputs: &[u64], aux: u64, out: u64, raw: u64, dims: [usize; 4]) -> Result<()> {
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
        self.launch(&c.kernel, grid, c.threads, c.smem, &args)
    }

    /// u = sp(BN(up2(b3))); `half` = [n, d, h, w] of b3.
    fn up(&self, b3: u64, u: u64, half: [usize; 4]) -> Result<()> {
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
        let grid = (launch::grid_1d(n * d * h * w), 1, 1);
        self.launch(&self.up_kernel, grid, launch::ELEMENTWISE_THREADS, 0, &args)
    }

    /// xd = avgpool2(x) of one channel; `half` = [n, d, h, w] of xd.
    fn pool(&self, x: u64, xd: u64, half: [usize; 4]) -> Result<()> {
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

    /// `x` converted to `dtype` (kernels/io_half.cu), or None when it is stored so already.
    fn converted(&self, x: &DevTensor, dtype: Precision) -> Result<Option<DevTensor>> {
        if x.dtype() == dtype {
            return Ok(None);
        }
        let out = self.runtime().tensor(x.shape(), dtype)?;
        let name = match (x.dtype(), dtype) {
            (Precision::F16, Precision::F32) => TO_F32_KERNEL,
            (Precision::F32, Precision::F16) => TO_F16_KERNEL,
            (from, to) => {
                // kernels/io_half.cu converts f16 only: the composed (dual-view) stages
                return Err(Error::invalid(format!(
                    "no {from:?} → {to:?} conversion on the GPU: dual-view models run in f32 or f16 storage, not bf16"
                )));
            }
        };
        let n = x.shape().len();
        let blocks = n.div_ceil(launch::ELEMENTWISE_THREADS as usize).clamp(1, 65_535 * 4) as u32;
        self.runtime().launch(&Launch {
            name,
            grid: (blocks, 1, 1),
            block: launch::ELEMENTWISE_THREADS,
            smem: 0,
            params: Params::Io(&IoArgs {
                src: x.ptr(),
                dst: out.ptr(),
                n: n as i64,
            }),
        })?;
        Ok(Some(out))
    }

    /// The fused kernel of a stage, when there is one for its layer, input channels and
    /// storage types.
    fn fused(&self, s: &Stage<'_, DevTensor, f32>) -> Option<&ConvDev> {
        let c = self.convs[s.layer? as usize].as_ref()?;
        let fits = s.inputs.len() == c.k.inputs.len()
            && s.inputs
                .iter()
                .zip(c.k.inputs)
                .all(|(t, &ch)| t.shape().c == ch && t.dtype() == self.storage(ch));
        fits.then_some(c)
    }

    /// A stage on one fused conv kernel; its epilogue must be the kernel's.
    fn fused_conv(&self, c: &ConvDev, s: &Stage<'_, DevTensor, f32>) -> Result<StageOut<DevTensor>> {
        let s0 = s.inputs[0].shape();
        let one = s0.with_c(1);
        let mismatch = || {
            Error::invalid(format!(
                "{}: the stage's epilogue is not that of its fused kernel ({:?})",
                c.k.layer.spec().name,
                c.k.epi
            ))
        };
        let aux_of = |a: &DevTensor| -> Result<u64> {
            if a.shape() != one || a.dtype() != Precision::F32 {
                return Err(Error::Shape(format!(
                    "{}: the RL node's operand is {} ({:?}), the stage {s0}",
                    c.k.layer.spec().name,
                    a.shape(),
                    a.dtype()
                )));
            }
            Ok(a.ptr())
        };
        // (aux, output channels, keep E_raw)
        if !s.epi.softplus {
            return Err(mismatch());
        }
        let (aux, out_c, keep_raw) = match (&s.node, &s.epi.addend, c.k.epi) {
            (Node::None, Addend::None, Epi::Sp) => (0, c.k.c_out, false),
            (Node::Divide { a, .. }, Addend::SoftplusOf(p), Epi::FpDiv) if std::ptr::eq(*a, *p) => {
                (aux_of(a)?, 1, false)
            }
            (Node::Update { a, keep_raw, .. }, Addend::None, Epi::Update) => (aux_of(a)?, 1, *keep_raw),
            (Node::Update { a, keep_raw, .. }, Addend::Const(v), Epi::UpdatePlus1) if *v == 1.0 => {
                (aux_of(a)?, 1, *keep_raw)
            }
            (Node::Mean, Addend::None, Epi::Mean) => (0, 1, false),
            _ => return Err(mismatch()),
        };
        let out = self.output(s0.with_c(out_c))?;
        let raw = keep_raw.then(|| self.output(one)).transpose()?;
        let ptrs: Vec<u64> = s.inputs.iter().map(|t| t.ptr()).collect();
        self.conv(
            c,
            &ptrs,
            aux,
            out.ptr(),
            raw.as_ref().map_or(0, |r| r.ptr()),
            [s0.n, s0.d, s0.h, s0.w],
        )?;
        Ok(StageOut { out, raw })
    }

    /// A stage composed of the training kernels (f32): f16 inputs widened first, the
    /// outputs stored as the fused kernels read them.
    fn composed(&self, s: &Stage<'_, DevTensor, f32>) -> Result<StageOut<DevTensor>> {
        let widened = s
            .inputs
            .iter()
            .map(|t| self.converted(t, Precision::F32))
            .collect::<Result<Vec<_>>>()?;
        let inputs: Vec<&DevTensor> = s
            .inputs
            .iter()
            .zip(&widened)
            .map(|(t, w)| w.as_ref().unwrap_or(t))
            .collect();
        let f32_stage = Stage {
            layer: s.layer,
            op: s.op,
            inputs: &inputs,
            weight: s.weight,
            c_out: s.c_out,
            epi: reborrow(&s.epi),
            node: match &s.node {
                Node::None => Node::None,
                Node::Divide { a, eps, post } => Node::Divide {
                    a: *a,
                    eps: *eps,
                    post: reborrow(post),
                },
                Node::Update { a, post, keep_raw } => Node::Update {
                    a: *a,
                    post: reborrow(post),
                    keep_raw: *keep_raw,
                },
                Node::Mean => Node::Mean,
            },
        };
        let r = composed_stage(&self.train, &f32_stage)?;
        // a layer's output as the fused kernels read it; the input's pooling and mean f32
        let store = |t: DevTensor| -> Result<DevTensor> {
            let want = match s.layer {
                Some(_) => self.storage(t.shape().c),
                None => Precision::F32,
            };
            Ok(self.converted(&t, want)?.unwrap_or(t))
        };
        Ok(StageOut {
            out: store(r.out)?,
            raw: r.raw.map(store).transpose()?,
        })
    }

    // ---- single kernels, for the differential tests against backend::cuda::twin ----

    /// Runs the conv kernel of layer `l` alone on host tensors (N×C×D×H×W, any size):
    /// the GPU side of the per-kernel differential tests ([`super::twin::conv_stage`]).
    pub fn run_conv_stage(&self, l: L, inputs: &[&Tensor<f32>], aux: Option<&Tensor<f32>>) -> Result<HostStageOut> {
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
        let c = self.convs[l as usize]
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{} has no fused kernel in this model", l.spec().name)))?;
        let bufs = inputs.iter().map(|t| self.upload(t)).collect::<Result<Vec<_>>>()?;
        let aux_buf = aux.map(|a| self.upload(a)).transpose()?;
        let out_c = if k.epi == Epi::Sp { k.c_out } else { 1 };
        let out = self.poisoned(s0.with_c(out_c))?;
        let raw = matches!(k.epi, Epi::Update | Epi::UpdatePlus1)
            .then(|| self.poisoned(s0.with_c(1)))
            .transpose()?;
        let ptrs: Vec<u64> = bufs.iter().map(|b| b.ptr()).collect();
        self.conv(
            c,
            &ptrs,
            aux_buf.as_ref().map_or(0, |b| b.ptr()),
            out.ptr(),
            raw.as_ref().map_or(0, |b| b.ptr()),
            [s0.n, s0.d, s0.h, s0.w],
        )?;
        let out_t = self.download(&out)?;
        let raw_t = raw.map(|r| self.download(&r)).transpose()?;
        Ok(HostStageOut { out: out_t, raw: raw_t })
    }

    /// Runs the up2 kernel alone: b3 (N×8×d×h×w) → u (N×4×2d×2h×2w).
    pub fn run_up_stage(&self, b3: &Tensor<f32>) -> Result<Tensor<f32>> {
        let s = b3.shape;
        let ib = self.upload(b3)?;
        let out = self.poisoned(Shape::new(s.n, 4, 2 * s.d, 2 * s.h, 2 * s.w))?;
        self.up(ib.ptr(), out.ptr(), [s.n, s.d, s.h, s.w])?;
        self.download(&out)
    }

    /// Runs the avgpool2 kernel alone: x (N×1×D×H×W, even) → xd.
    pub fn run_pool_stage(&self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let s = x.shape;
        let ib = self.upload(x)?;
        let os = Shape::new(s.n, 1, s.d / 2, s.h / 2, s.w / 2);
        let out = self.poisoned(os)?;
        self.pool(ib.ptr(), out.ptr(), [os.n, os.d, os.h, os.w])?;
        self.download(&out)
    }

    /// A host tensor in the device layout: channels-last, the storage type of its channels.
    fn upload(&self, t: &Tensor<f32>) -> Result<DevTensor> {
        self.runtime().upload_tensor(t, self.storage(t.shape.c))
    }

    fn download(&self, t: &DevTensor) -> Result<Tensor<f32>> {
        self.runtime()
            .download_tensor(t)
            .map_err(|e| e.context("running a test kernel and copying its output"))
    }

    /// An output tensor filled with 0xFF bytes (NaN in f32 and f16), so that an element
    /// the kernel fails to write shows up as NaN.
    fn poisoned(&self, shape: Shape) -> Result<DevTensor> {
        let t = self.output(shape)?;
        self.runtime().memset(t.ptr(), 0xFF, shape.len() * t.dtype().bytes())?;
        Ok(t)
    }
}

/// The same epilogue, borrowed for a shorter time (its addend may name a tensor).
fn reborrow<'b>(e: &'b Epilogue<'_, DevTensor, f32>) -> Epilogue<'b, DevTensor, f32> {
    Epilogue {
        scale: e.scale,
        shift: e.shift,
        softplus: e.softplus,
        addend: match e.addend {
            Addend::None => Addend::None,
            Addend::Const(v) => Addend::Const(v),
            Addend::SoftplusOf(t) => Addend::SoftplusOf(t),
        },
    }
}

/// Copies `data` into a new device allocation and waits for the copy (weights).
fn upload<T: bytemuck::Pod>(rt: &Arc<Runtime>, data: &[T], what: &str) -> Result<DevMem> {
    let m = rt.upload(data).map_err(|e| e.context(format!("uploading {what}")))?;
    rt.synchronize().map_err(|e| e.context(format!("uploading {what}")))?;
    Ok(m)
}

impl Backend for CudaInferBackend {
    type T = f32;
    type X = DevTensor;
    type Grads = <CudaTrainBackend as Backend>::Grads;
    type Opt = <CudaTrainBackend as Backend>::Opt;

    /// The fused kernels where a stage has one, else the stage composed of the training
    /// kernels.
    fn stage(&self, s: &Stage<'_, DevTensor, f32>) -> Result<StageOut<DevTensor>> {
        match s.op {
            StageOp::Conv3 => match self.fused(s) {
                Some(c) => self.fused_conv(c, s),
                None => self.composed(s),
            },
            StageOp::Up2
                if s.layer == Some(L::H1BpUp)
                    && matches!(s.node, Node::None)
                    && s.inputs.len() == 1
                    && s.inputs[0].shape().c == L::H1BpUp.spec().c_in
                    && s.inputs[0].dtype() == self.storage(L::H1BpUp.spec().c_in) =>
            {
                let x = s.inputs[0].shape();
                let out = self.output(Shape::new(x.n, s.c_out, 2 * x.d, 2 * x.h, 2 * x.w))?;
                self.up(s.inputs[0].ptr(), out.ptr(), [x.n, x.d, x.h, x.w])?;
                Ok(StageOut { out, raw: None })
            }
            StageOp::Pool
                if s.inputs.len() == 1 && s.inputs[0].shape().c == 1 && s.inputs[0].dtype() == Precision::F32 =>
            {
                let x = s.inputs[0].shape();
                if x.d % 2 + x.h % 2 + x.w % 2 != 0 {
                    return Err(Error::Shape(format!("avgpool2 needs even sizes, got {x}")));
                }
                let os = Shape::new(x.n, 1, x.d / 2, x.h / 2, x.w / 2);
                launch::check_dims(x.n, x.d, x.h, x.w)?;
                let out = self.output(os)?;
                self.pool(s.inputs[0].ptr(), out.ptr(), [os.n, os.d, os.h, os.w])?;
                Ok(StageOut { out, raw: None })
            }
            _ => self.composed(s),
        }
    }

    fn shape(&self, x: &DevTensor) -> Shape {
        x.shape()
    }
    /// The input as the network reads it: f32.
    fn from_host(&self, t: &Tensor<f32>) -> Result<DevTensor> {
        self.train.from_host(t)
    }
    /// Any stored type back as f32.
    fn to_host(&self, x: &DevTensor) -> Result<Tensor<f32>> {
        self.runtime().download_tensor(x)
    }
    fn conv3(
        &self,
        inputs: &[&DevTensor],
        weight: &[f32],
        c_out: usize,
        epi: &Epilogue<'_, DevTensor, f32>,
    ) -> Result<DevTensor> {
        self.train.conv3(inputs, weight, c_out, epi)
    }
    fn up2(
        &self,
        x: &DevTensor,
        weight: &[f32],
        c_out: usize,
        epi: &Epilogue<'_, DevTensor, f32>,
    ) -> Result<DevTensor> {
        self.train.up2(x, weight, c_out, epi)
    }
    fn epilogue(&self, z: &DevTensor, epi: &Epilogue<'_, DevTensor, f32>) -> Result<DevTensor> {
        self.train.epilogue(z, epi)
    }
    fn avgpool2(&self, x: &DevTensor) -> Result<DevTensor> {
        self.train.avgpool2(x)
    }
    fn channel_mean(&self, x: &DevTensor) -> Result<DevTensor> {
        self.train.channel_mean(x)
    }
    fn batch_stats(&self, z: &DevTensor) -> Result<ChannelStats> {
        self.train.batch_stats(z)
    }
    fn rl_divide(&self, a: &DevTensor, fp: &DevTensor, eps: f64) -> Result<DevTensor> {
        self.train.rl_divide(a, fp, eps)
    }
    fn rl_update(&self, a: &DevTensor, bp: &DevTensor) -> Result<DevTensor> {
        self.train.rl_update(a, bp)
    }
    fn loss(
        &self,
        y: &DevTensor,
        e1r: &DevTensor,
        x1: &DevTensor,
        g: &DevTensor,
    ) -> Result<(LossTerms, DevTensor, DevTensor)> {
        self.train.loss(y, e1r, x1, g)
    }
    fn epilogue_backward(
        &self,
        z: &DevTensor,
        dy: &DevTensor,
        softplus: bool,
        bn: Option<&BnTrainState<f32>>,
    ) -> Result<(DevTensor, Vec<f64>, Vec<f64>)> {
        self.train.epilogue_backward(z, dy, softplus, bn)
    }
    fn conv3_backward_data(
        &self,
        dz: &DevTensor,
        weight: &[f32],
        c_in: &[usize],
        needed: &[bool],
    ) -> Result<Vec<Option<DevTensor>>> {
        self.train.conv3_backward_data(dz, weight, c_in, needed)
    }
    fn conv3_backward_weight(&self, inputs: &[&DevTensor], dz: &DevTensor) -> Result<Vec<f64>> {
        self.train.conv3_backward_weight(inputs, dz)
    }
    fn up2_backward_data(&self, dz: &DevTensor, weight: &[f32], c_in: usize) -> Result<DevTensor> {
        self.train.up2_backward_data(dz, weight, c_in)
    }
    fn up2_backward_weight(&self, x: &DevTensor, dz: &DevTensor) -> Result<Vec<f64>> {
        self.train.up2_backward_weight(x, dz)
    }
    fn rl_divide_backward(
        &self,
        a: &DevTensor,
        fp: &DevTensor,
        eps: f64,
        dq: &DevTensor,
        mode: GradMode,
    ) -> Result<(DevTensor, DevTensor)> {
        self.train.rl_divide_backward(a, fp, eps, dq, mode)
    }
    fn rl_update_backward(
        &self,
        a: &DevTensor,
        bp: &DevTensor,
        de: &DevTensor,
        mode: GradMode,
    ) -> Result<(DevTensor, DevTensor)> {
        self.train.rl_update_backward(a, bp, de, mode)
    }
    fn channel_mean_backward(&self, dy: &DevTensor, channels: usize) -> Result<DevTensor> {
        self.train.channel_mean_backward(dy, channels)
    }
    fn accumulate(&self, acc: &mut DevTensor, t: &DevTensor) -> Result<()> {
        self.train.accumulate(acc, t)
    }
    fn grads_new(&self, variant: Variant) -> Result<Self::Grads> {
        self.train.grads_new(variant)
    }
    fn opt_new(&self, model: &Model<f32>, adam: &Adam) -> Result<Self::Opt> {
        self.train.opt_new(model, adam)
    }
    fn opt_step(
        &self,
        opt: &mut Self::Opt,
        grads: &Self::Grads,
        stats: &[Option<ChannelStats>],
        model: &mut Model<f32>,
    ) -> Result<bool> {
        self.train.opt_step(opt, grads, stats, model)
    }
    fn opt_download(&self, opt: &Self::Opt, model: &mut Model<f32>) -> Result<Adam> {
        self.train.opt_download(opt, model)
    }
    fn pad_even(&self, x: &DevTensor) -> Result<DevTensor> {
        self.train.pad_even(x)
    }
    fn crop(&self, x: &DevTensor, shape: Shape) -> Result<DevTensor> {
        self.train.crop(x, shape)
    }
    fn uncrop_zeros(&self, x: &DevTensor, shape: Shape) -> Result<DevTensor> {
        self.train.uncrop_zeros(x, shape)
    }
}
