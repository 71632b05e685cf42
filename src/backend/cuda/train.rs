//! The CUDA training backend: every op of [`Backend`] and its gradient on the device, in
//! f32, so that the generic network ([`crate::net::Rln`]) runs forward with batch
//! statistics and backward unchanged on the GPU (kernels/train_conv.cu, train_ops.cu).
//!
//! - Everything goes through the CUDA runtime ([`super::runtime::Runtime`]), which the
//!   inference network shares: tensors ([`DevTensor`]) are f32, channels-last (N·D·H·W
//!   voxels × C) like the inference kernels, allocated from the device's stream-ordered
//!   memory pool (cuMemAllocAsync / cuMemFreeAsync on the compute stream, release
//!   threshold raised so the pool keeps its memory): a training step allocates and frees
//!   ~150 tensors without a device synchronization.
//! - In a resident step ([`crate::net::Rln::resident`], the training loop) nothing goes
//!   through the host between the batch upload and the next step: the convs read their
//!   weights gathered from the FP32 master copy on the device (`t_gather`, tables made
//!   once), batch norm reduces its statistics into the resident state and folds them with
//!   γ, β there (`t_bn_fold`), the loss's constants are computed there (`t_loss_finish`),
//!   gradients are reduced into the resident gradient buffer and Adam reads lr_t from
//!   device memory (train_params.rs). The host reads the loss and the steps' outcome when
//!   it polls (every [`crate::train::trainer::POLL_EVERY`] steps, before validation and
//!   checkpoints). Outside a resident step (one op at a time, the tests' oracle), weights
//!   arrive as host slices uploaded per call and statistics, γ/β gradients and the loss
//!   come back to the host as the trait's values.
//! - The runtime can capture such device-only work as a CUDA graph and replay it
//!   ([`Runtime::begin_capture`]): a copy to or from the host inside a capture is refused.
//! - Results are deterministic (no atomics; grids of reductions depend only on sizes).
//! - Every op returns a [`Result`]: a failed driver call or launch is an [`Error::Cuda`],
//!   and an allocation the device cannot satisfy is an [`Error::OutOfMemory`] (the caller
//!   reports it, or retries smaller).
//! - Tests: `poison` fills every new allocation with NaN bytes, so a kernel that leaves an
//!   element unwritten shows up as a non-finite value (RLN_CUDA_POISON=1 or
//!   [`CudaTrainBackend::with_poison`]); RLN_CUDA_SYNC=1 synchronizes after every launch.

use super::device::CudaDevice;
use super::launch::grid_1d;
use super::runtime::{DevMem, DevTensor, Launch, Params, Runtime};
use super::train_launch::{self as tl, TrainArgs};
use super::Precision;
use crate::backend::cpu::pointwise;
use crate::backend::loss::{loss_from_sums, LossSums, LossTerms};
use crate::backend::optim::Adam;
use crate::backend::{
    Addend, Backend, BnTrainState, BnTrained, ChannelStats, Epilogue, GradMode, LayerWeight, TrainPrecision,
};
use crate::error::{Error, Result};
use crate::model::{Model, Variant};
use crate::tensor::{Shape, Tensor};
use cudarc::driver::CudaStream;
use std::sync::Arc;

// the resident training state (weights, Adam, running statistics); a child module, so it
// reaches this file's allocator and launch helpers
#[path = "train_params.rs"]
mod train_params;
pub(crate) use train_params::{ADAM_KERNELS, ADAM_MODULE};

/// The executor trait, under the path the emulation of the training kernels implements it.
#[cfg(test)]
pub(crate) use super::runtime::Exec;

/// f64 slots of the loss on the device: the 7 sums, then the gradient's 8 constants.
pub(crate) const LOSS_SLOTS: usize = 15;

/// The loss terms and the gradient's constants from the 7 sums at the start of `v`
/// ([μy, μg, Σ(y−μy)², Σ(g−μg)², Σ(y−μy)(g−μg), Σ(y−g)², Σ aux²]) and n in `v[7]` when
/// present: the host's arithmetic ([`loss_from_sums`]) on what the device reduced.
pub(crate) fn loss_sums_at(v: &[f64]) -> (LossTerms, crate::backend::loss::LossGradConsts) {
    let n = v[7];
    loss_from_sums(&LossSums {
        n,
        sum_y: v[0] * n,
        sum_g: v[1] * n,
        sq_y: v[2],
        sq_g: v[3],
        cross: v[4],
        sq_err: v[5],
        sq_aux: v[6],
    })
}

/// The training backend bound to one device.
pub struct CudaTrainBackend {
    rt: Arc<Runtime>,
    /// Whether the training loop records its step as a graph and replays it
    /// ([`Backend::capture_begin`]; RLN_CUDA_GRAPHS=0 turns it off: the step then runs
    /// op by op, with the same results).
    graphs: bool,
    /// FP32 convs, or the wide ones on the tensor cores with bf16 operands
    /// ([`TrainPrecision::Mixed`], train_launch::MMA_VARIANTS).
    precision: TrainPrecision,
    /// Whether a resident conv whose output feeds a training-mode batch norm sums the batch
    /// statistics in its epilogue (default on; off: the separate two-pass `t_chan_sum`).
    fused_bn_stats: bool,
    /// The statistics partials the last such conv wrote, until its batch norm takes them.
    bn_sums: std::sync::Mutex<Option<ConvBnSums>>,
}

/// Batch-statistics partials of a conv's output, written by its epilogue (tl::EPI_STATS):
/// part[block][2·C] = [Σ z | Σ z²] for the output tensor at `z` of layer `layer`.
struct ConvBnSums {
    layer: usize,
    z: u64,
    part: DevMem,
    blocks: usize,
}

/// Checks that tensors agree in batch and volume size.
fn same_volume(what: &str, a: Shape, b: Shape) -> Result<()> {
    if a.n != b.n || a.dims() != b.dims() {
        return Err(Error::Shape(format!(
            "{what}: {a} and {b} differ in batch or volume size"
        )));
    }
    Ok(())
}

/// Checks up2's weight (`n` values) against C_in·C_out·8, at most 16 channels each way.
fn up2_weight_fits(n: usize, c_in: usize, c_out: usize) -> Result<()> {
    if n != c_in * c_out * 8 || c_in > 16 || c_out > 16 {
        return Err(Error::invalid(format!(
            "up2: weight has {n} values for {c_in}→{c_out} channels"
        )));
    }
    Ok(())
}

/// Checks up2's data gradient: a weight of `n` = C_in·C_out·8 values, dz of even sizes.
fn up2_backward_fits(n: usize, dz: Shape, c_in: usize) -> Result<()> {
    if n != c_in * dz.c * 8 || dz.d % 2 + dz.h % 2 + dz.w % 2 != 0 {
        return Err(Error::invalid("up2 backward: weight or sizes do not match"));
    }
    Ok(())
}

/// Checks conv3's data gradient: a weight of `n` = C_out·ΣC_in·27 values.
fn conv3_backward_fits(n: usize, c_out: usize, c_in: &[usize]) -> Result<()> {
    if n != c_out * c_in.iter().sum::<usize>() * 27 {
        return Err(Error::invalid(
            "conv3 backward: weight size does not match the channels",
        ));
    }
    Ok(())
}

impl CudaTrainBackend {
    /// The backend on an opened device (RLN_CUDA_POISON=1 turns poisoning on).
    pub fn new(dev: Arc<CudaDevice>) -> Result<Self> {
        let poison = std::env::var("RLN_CUDA_POISON").is_ok_and(|v| v == "1");
        Self::with_poison(dev, poison)
    }

    /// Opens device `ordinal` for training.
    pub fn open(ordinal: usize) -> Result<Self> {
        Self::new(CudaDevice::open(ordinal)?)
    }

    /// As [`CudaTrainBackend::new`], with NaN-poisoned allocations when `poison` is set.
    pub fn with_poison(dev: Arc<CudaDevice>, poison: bool) -> Result<Self> {
        let sync_each = std::env::var("RLN_CUDA_SYNC").is_ok_and(|v| v == "1");
        Ok(CudaTrainBackend {
            rt: Runtime::cuda(dev, sync_each, poison)?,
            graphs: !std::env::var("RLN_CUDA_GRAPHS").is_ok_and(|v| v == "0"),
            precision: TrainPrecision::Fp32,
            fused_bn_stats: true,
            bn_sums: Default::default(),
        })
    }

    /// The backend on a runtime another user shares (CUDA inference composes the stages
    /// its fused kernels do not cover of these ops).
    pub fn on_runtime(rt: Arc<Runtime>) -> Self {
        // graphs are the training loop's; inference composes single ops
        CudaTrainBackend {
            rt,
            graphs: false,
            precision: TrainPrecision::Fp32,
            fused_bn_stats: true,
            bn_sums: Default::default(),
        }
    }

    /// The backend on another executor (the CPU emulation of the unit tests).
    #[cfg(test)]
    pub(crate) fn on_exec(exec: Arc<dyn Exec>, poison: bool) -> Self {
        CudaTrainBackend {
            rt: Runtime::on_exec(exec, poison),
            graphs: true,
            precision: TrainPrecision::Fp32,
            fused_bn_stats: true,
            bn_sums: Default::default(),
        }
    }

    /// The arithmetic of the convs from now on (default FP32; [`TrainPrecision::Mixed`]:
    /// the wide convs on the tensor cores with bf16 operands, f32 accumulation).
    pub fn set_precision(&mut self, p: TrainPrecision) {
        self.precision = p;
    }

    pub fn precision(&self) -> TrainPrecision {
        self.precision
    }

    /// Batch statistics of a conv's output in the conv's epilogue (on, the default) or in
    /// a separate two-pass reduction over the output (off; the path before, for comparison).
    pub fn set_fused_bn_stats(&mut self, on: bool) {
        self.fused_bn_stats = on;
    }

    /// The partials of layer `layer`'s conv output at `z`, if its epilogue summed them.
    pub(super) fn take_conv_bn_sums(&self, layer: usize, z: u64) -> Option<(DevMem, usize)> {
        let mut g = self.bn_sums.lock().unwrap();
        match g.take() {
            Some(p) if p.layer == layer && p.z == z => Some((p.part, p.blocks)),
            _ => None,
        }
    }

    /// Whether a conv of these channel counts runs on the tensor cores.
    fn uses_mma(&self, v: [usize; 4]) -> bool {
        self.precision == TrainPrecision::Mixed && tl::MMA_VARIANTS.contains(&v)
    }

    /// Whether the training loop may record and replay its step as a graph (default on;
    /// off, it runs the step op by op with the same results).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
    }

    /// The runtime every allocation, copy and launch of this backend goes through.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }

    /// The CUDA device (None for the emulation of the unit tests).
    pub fn device(&self) -> Option<&Arc<CudaDevice>> {
        self.rt.device()
    }

    /// The stream every launch and copy of this backend goes to (None when emulated).
    pub fn stream(&self) -> Option<&Arc<CudaStream>> {
        self.rt.device().map(|d| &d.compute)
    }

    /// "NVIDIA H100 … (sm_90, 132 SMs)", or "CPU emulation".
    pub fn describe(&self) -> String {
        self.rt.describe()
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.rt.synchronize()
    }

    /// Bytes of tensors alive now, and at most since the last [`Self::reset_peak`].
    pub fn mem_bytes(&self) -> (usize, usize) {
        self.rt.mem_bytes()
    }
    pub fn reset_peak(&self) {
        self.rt.reset_peak()
    }

    /// Starts recording an event pair around every launch (see [`Self::take_profile`]).
    pub fn start_profile(&self) {
        self.rt.start_profile()
    }

    /// Waits for the profiled launches; returns (kernel, milliseconds) in launch order.
    pub fn take_profile(&self) -> Result<Vec<(String, f64)>> {
        self.rt.take_profile()
    }

    fn alloc(&self, bytes: usize) -> Result<DevMem> {
        self.rt.alloc(bytes)
    }

    /// An uninitialized f32 tensor (NaN when poisoning).
    fn tensor(&self, shape: Shape) -> Result<DevTensor> {
        self.rt.tensor(shape, Precision::F32)
    }

    fn zeros_f64(&self, len: usize) -> Result<DevMem> {
        let m = self.alloc(len * 8)?;
        self.rt.memset(m.ptr(), 0, len * 8)?;
        Ok(m)
    }

    fn upload_f32(&self, data: &[f32]) -> Result<DevMem> {
        self.rt.upload(data)
    }

    fn download_f64(&self, m: &DevMem, len: usize, what: &str) -> Result<Vec<f64>> {
        let mut v = vec![0.0f64; len];
        self.rt
            .dtoh(&mut v, m.ptr())
            .map_err(|e| Error::Cuda(format!("copying {what} to the host: {e}")))?;
        Ok(v)
    }

    fn launch(&self, name: &str, grid: (u32, u32, u32), smem: usize, args: &TrainArgs) -> Result<()> {
        self.rt.launch(&Launch {
            name,
            grid,
            block: tl::THREADS,
            smem,
            params: Params::Train(args),
        })
    }

    /// A grid-stride elementwise kernel over `count` items.
    fn launch_1d(&self, name: &str, count: usize, mut args: TrainArgs) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        args.count = count as i64;
        self.launch(name, (grid_1d(count), 1, 1), 0, &args)
    }

    /// dst[j] = scale · Σ_b part[b][j] for j < J (device f64).
    fn reduce(&self, part: &DevMem, blocks: usize, j: usize, scale: f64, dst: u64) -> Result<()> {
        let args = TrainArgs {
            part: part.ptr(),
            stat: dst,
            k0: j as i32,
            k1: blocks as i32,
            dc: [scale, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            ..TrainArgs::default()
        };
        self.launch("t_reduce_part", (j as u32, 1, 1), 0, &args)
    }

    /// Fills scale/shift, softplus and the addend of `args` from `epi` (channels C of a
    /// tensor of shape s).
    fn set_epilogue(&self, args: &mut TrainArgs, epi: &Epilogue<'_, DevTensor, f32>, s: Shape) -> Result<()> {
        args.p[0] = tl::channel_array(epi.scale, s.c, 1.0);
        args.p[1] = tl::channel_array(epi.shift, s.c, 0.0);
        args.mode = if epi.softplus { tl::EPI_SOFTPLUS } else { 0 };
        match epi.addend {
            Addend::None => {}
            Addend::Const(v) => {
                args.mode |= tl::ADD_CONST;
                args.f[0] = v;
            }
            Addend::SoftplusOf(t) => {
                if t.shape != s.with_c(1) {
                    return Err(Error::Shape(format!("epilogue addend {} for a tensor {s}", t.shape)));
                }
                args.mode |= tl::ADD_SOFTPLUS;
                args.inp[3] = t.ptr();
            }
        }
        Ok(())
    }

    /// conv3 over the concatenation of `inputs` with weights already packed
    /// [ci][27][co] (host values, uploaded), then the epilogue in `args` (p, mode, f, inp[3]).
    fn conv_packed(&self, inputs: &[&DevTensor], packed: &[f32], c_out: usize, args: TrainArgs) -> Result<DevTensor> {
        let w = self.upload_f32(packed)?;
        self.conv_packed_at(inputs, w.ptr(), packed.len(), c_out, args, None)
    }

    /// [`Self::conv_packed`] with the packed weights (`n` values) at device address `wt`.
    /// With `stats_layer` and tl::EPI_STATS in `args.mode`, a variant kernel's epilogue also
    /// sums the output's batch statistics, kept for that layer's batch norm (ConvBnSums).
    fn conv_packed_at(
        &self,
        inputs: &[&DevTensor],
        wt: u64,
        n: usize,
        c_out: usize,
        mut args: TrainArgs,
        stats_layer: Option<usize>,
    ) -> Result<DevTensor> {
        if inputs.is_empty() || inputs.len() > 3 {
            return Err(Error::invalid(format!(
                "conv3 on the GPU takes 1 to 3 inputs, got {}",
                inputs.len()
            )));
        }
        let s0 = inputs[0].shape;
        let mut cs = [0usize; 3];
        for (i, t) in inputs.iter().enumerate() {
            same_volume("conv3 inputs", t.shape, s0)?;
            cs[i] = t.shape.c;
        }
        let cin: usize = cs.iter().sum();
        if n != cin * 27 * c_out {
            return Err(Error::invalid(format!(
                "conv3 weight has {n} values, expected {c_out}×{cin}×27"
            )));
        }
        if c_out > 16 || cin > 64 {
            return Err(Error::invalid(format!(
                "conv3 on the GPU: at most 16 output channels (got {c_out})"
            )));
        }
        let out_shape = s0.with_c(c_out);
        let out = self.tensor(out_shape)?;
        args = args.dims(s0);
        args.inp[0] = inputs[0].ptr();
        args.inp[1] = inputs.get(1).map_or(0, |t| t.ptr());
        args.inp[2] = inputs.get(2).map_or(0, |t| t.ptr());
        args.ca = cs[0] as i32;
        args.cb = cs[1] as i32;
        args.cc = cs[2] as i32;
        args.cout = c_out as i32;
        args.wt = wt;
        args.out[0] = out.ptr();
        let v = [cs[0], cs[1], cs[2], c_out];
        let (name, grid, smem) = if self.uses_mma(v) {
            (tl::mma_fwd_name(v), tl::mma_grid(s0), tl::mma_fwd_smem_bytes(cin))
        } else if tl::FWD_VARIANTS.contains(&v) {
            (tl::fwd_name(v), tl::conv_grid(s0), tl::fwd_smem_bytes(cin, c_out))
        } else {
            args.mode &= !tl::EPI_STATS;
            self.launch_1d(tl::CONV_ANY_FWD, out_shape.len(), args)?;
            return Ok(out);
        };
        args.count = out_shape.len() as i64;
        let stats_layer = stats_layer.filter(|_| args.mode & tl::EPI_STATS != 0);
        let part = match stats_layer {
            Some(_) => {
                let p = self.alloc(tl::grid_blocks(grid) * 2 * c_out * 8)?;
                args.part = p.ptr();
                Some(p)
            }
            None => {
                args.mode &= !tl::EPI_STATS;
                None
            }
        };
        self.launch(&name, grid, smem, &args)?;
        if let (Some(layer), Some(part)) = (stats_layer, part) {
            *self.bn_sums.lock().unwrap() = Some(ConvBnSums {
                layer,
                z: out.ptr(),
                part,
                blocks: tl::grid_blocks(grid),
            });
        }
        Ok(out)
    }

    /// conv3 with layer `w.layer`'s weight gathered from the resident master copy.
    fn resident_conv3(
        &self,
        inputs: &[&DevTensor],
        w: LayerWeight<'_, Self>,
        opt: &train_params::DevOpt,
        c_out: usize,
        epi: &Epilogue<'_, DevTensor, f32>,
    ) -> Result<DevTensor> {
        let cin: usize = inputs.iter().map(|t| t.shape.c).sum();
        let packed = self.resident_packed(opt, w.layer, w.host.len(), cin, c_out, 0, cin, false)?;
        let mut args = TrainArgs::default();
        self.set_epilogue(&mut args, epi, inputs[0].shape.with_c(c_out))?;
        // z of a layer with batch norm (identity epilogue): its statistics in the epilogue
        let feeds_bn = opt.has_bn(w.layer) && epi.is_identity();
        let stats_layer = (self.fused_bn_stats && feeds_bn).then_some(w.layer);
        if stats_layer.is_some() {
            args.mode |= tl::EPI_STATS;
        }
        self.conv_packed_at(inputs, packed.ptr(), w.host.len(), c_out, args, stats_layer)
    }

    /// The data gradients of conv3 with layer `w.layer`'s weight from the resident copy.
    fn resident_conv3_backward_data(
        &self,
        dz: &DevTensor,
        w: LayerWeight<'_, Self>,
        opt: &train_params::DevOpt,
        c_in: &[usize],
        needed: &[bool],
    ) -> Result<Vec<Option<DevTensor>>> {
        let c_out = dz.shape.c;
        let c_total: usize = c_in.iter().sum();
        self.per_input_slice(c_in, needed, |offset, cs, args| {
            let packed = self.resident_packed(opt, w.layer, w.host.len(), c_total, c_out, offset, cs, true)?;
            self.conv_packed_at(&[dz], packed.ptr(), c_out * 27 * cs, cs, args, None)
        })
    }

    /// The data gradient of each concatenated input slice (`c_in` channels each) that is
    /// `needed`: `grad_of(offset, channels, args)` convolves dz with that slice's flipped,
    /// transposed weight (args: the identity epilogue).
    fn per_input_slice(
        &self,
        c_in: &[usize],
        needed: &[bool],
        mut grad_of: impl FnMut(usize, usize, TrainArgs) -> Result<DevTensor>,
    ) -> Result<Vec<Option<DevTensor>>> {
        let mut offset = 0;
        let mut out = Vec::new();
        for (&cs, &need) in c_in.iter().zip(needed) {
            if need {
                let mut args = TrainArgs::default();
                args.p[0] = [1.0; 16];
                out.push(Some(grad_of(offset, cs, args)?));
            } else {
                out.push(None);
            }
            offset += cs;
        }
        Ok(out)
    }

    /// The weight gradient's per-block partial sums: (partials, blocks, weights); reduced
    /// by [`Self::reduce`] wherever the gradient is wanted.
    fn conv3_wgrad_partials(&self, inputs: &[&DevTensor], dz: &DevTensor) -> Result<(DevMem, usize, usize)> {
        if inputs.is_empty() || inputs.len() > 3 {
            return Err(Error::invalid("conv3 weight gradient: 1 to 3 inputs"));
        }
        let s0 = inputs[0].shape;
        let mut cs = [0usize; 3];
        for (i, t) in inputs.iter().enumerate() {
            same_volume("conv3 weight gradient", t.shape, s0)?;
            cs[i] = t.shape.c;
        }
        same_volume("conv3 weight gradient (dz)", dz.shape, s0)?;
        let cin: usize = cs.iter().sum();
        let c_out = dz.shape.c;
        let nw = c_out * cin * 27;
        let mut args = TrainArgs::default().dims(s0);
        args.inp = [
            inputs[0].ptr(),
            inputs.get(1).map_or(0, |t| t.ptr()),
            inputs.get(2).map_or(0, |t| t.ptr()),
            dz.ptr(),
        ];
        args.ca = cs[0] as i32;
        args.cb = cs[1] as i32;
        args.cc = cs[2] as i32;
        args.cout = c_out as i32;
        let v = [cs[0], cs[1], cs[2], c_out];
        let (part, blocks) = if self.uses_mma(v) {
            // one f32 mma chain per tile and (tap, channel) chunk, f64 across a block's tiles
            let blocks = tl::wgrad_blocks(tl::mma_tiles(s0), 1);
            let part = self.alloc(blocks * nw * 8)?;
            args.part = part.ptr();
            self.launch(
                &tl::mma_wgrad_name(v),
                (blocks as u32, 1, 1),
                tl::mma_wgrad_smem_bytes(cin),
                &args,
            )?;
            (part, blocks)
        } else if tl::WGRAD_VARIANTS.contains(&v) {
            let chunks = cin / tl::chunk(cin);
            let blocks = tl::wgrad_blocks(tl::conv_tiles(s0), chunks);
            let part = self.alloc(blocks * nw * 8)?;
            args.part = part.ptr();
            self.launch(
                &tl::wgrad_name(v),
                (blocks as u32, chunks as u32, 1),
                tl::wgrad_smem_bytes(cin, c_out),
                &args,
            )?;
            (part, blocks)
        } else {
            let voxels = s0.n * s0.spatial();
            let chunks = voxels.div_ceil(tl::ANY_WGRAD_CHUNK);
            let part = self.alloc(chunks * nw * 8)?;
            args.part = part.ptr();
            args.k0 = tl::ANY_WGRAD_CHUNK as i32;
            self.launch_1d(tl::CONV_ANY_WGRAD, chunks * nw, args)?;
            (part, chunks)
        };
        Ok((part, blocks, nw))
    }

    /// up2 with its weight (engine layout, C_in·C_out·8 values) at device address `wt`.
    fn up2_at(&self, x: &DevTensor, wt: u64, c_out: usize, epi: &Epilogue<'_, DevTensor, f32>) -> Result<DevTensor> {
        let s = x.shape;
        let os = Shape::new(s.n, c_out, 2 * s.d, 2 * s.h, 2 * s.w);
        let out = self.tensor(os)?;
        let mut args = TrainArgs::default().dims(os);
        self.set_epilogue(&mut args, epi, os)?;
        args.inp[0] = x.ptr();
        args.wt = wt;
        args.out[0] = out.ptr();
        args.ca = s.c as i32;
        args.cout = c_out as i32;
        self.launch_1d("t_up2_fwd", os.n * os.spatial(), args)?;
        Ok(out)
    }

    /// up2's data gradient with its weight at device address `wt`.
    fn up2_backward_data_at(&self, dz: &DevTensor, wt: u64, c_in: usize) -> Result<DevTensor> {
        let os = dz.shape;
        let s = Shape::new(os.n, c_in, os.d / 2, os.h / 2, os.w / 2);
        let out = self.tensor(s)?;
        let mut args = TrainArgs::default().dims(s);
        args.inp[0] = dz.ptr();
        args.wt = wt;
        args.out[0] = out.ptr();
        args.ca = c_in as i32;
        args.cout = os.c as i32;
        self.launch_1d("t_up2_bwd_data", s.len(), args)?;
        Ok(out)
    }

    /// up2's weight-gradient partial sums: (partials, blocks, weights).
    fn up2_wgrad_partials(&self, x: &DevTensor, dz: &DevTensor) -> Result<(DevMem, usize, usize)> {
        let (s, os) = (x.shape, dz.shape);
        if os.n != s.n || os.d != 2 * s.d || os.h != 2 * s.h || os.w != 2 * s.w || os.c > 16 {
            return Err(Error::Shape(format!("up2 weight gradient: x {s}, dz {os}")));
        }
        let nw = s.c * os.c * 8;
        let chunks = (s.n * s.spatial()).div_ceil(tl::UP2_WGRAD_CHUNK);
        let part = self.alloc(chunks * nw * 8)?;
        let mut args = TrainArgs::default().dims(s);
        args.inp[0] = x.ptr();
        args.inp[3] = dz.ptr();
        args.part = part.ptr();
        args.ca = s.c as i32;
        args.cout = os.c as i32;
        args.k0 = tl::UP2_WGRAD_CHUNK as i32;
        self.launch_1d("t_up2_wgrad", chunks * s.c * 8, args)?;
        Ok((part, chunks, nw))
    }

    /// The epilogue; with `params` nonzero, its scale and shift (16 f32 each) are read
    /// from that device address instead of `epi` (the resident batch norm).
    fn epilogue_at(&self, z: &DevTensor, epi: &Epilogue<'_, DevTensor, f32>, params: u64) -> Result<DevTensor> {
        let out = self.tensor(z.shape)?;
        let mut args = TrainArgs::default().dims(z.shape);
        self.set_epilogue(&mut args, epi, z.shape)?;
        args.wt = params;
        args.inp[0] = z.ptr();
        args.out[0] = out.ptr();
        args.ca = z.shape.c as i32;
        self.launch_1d("t_epilogue", z.shape.len(), args)?;
        Ok(out)
    }

    /// The batch statistics of z (C a power of two ≤ 16) reduced on the device into
    /// `stat`: [mean (C), biased variance (C)], f64.
    fn batch_stats_to(&self, z: &DevTensor, stat: u64) -> Result<()> {
        let s = z.shape;
        let c = s.c;
        if !matches!(c, 1 | 2 | 4 | 8 | 16) {
            return Err(Error::invalid(format!(
                "batch statistics on the device need 1, 2, 4, 8 or 16 channels, got {c}"
            )));
        }
        let count = s.len();
        let m = (s.n * s.spatial()) as f64;
        let blocks = tl::reduction_blocks(count);
        let part = self.alloc(blocks * c * 8)?;
        let mut args = TrainArgs::default();
        args.inp[0] = z.ptr();
        args.part = part.ptr();
        args.stat = stat;
        args.ca = c as i32;
        args.count = count as i64;
        self.launch("t_chan_sum", (blocks as u32, 1, 1), 0, &args)?;
        self.reduce(&part, blocks, c, 1.0 / m, stat)?;
        args.mode = 1;
        self.launch("t_chan_sum", (blocks as u32, 1, 1), 0, &args)?;
        self.reduce(&part, blocks, c, 1.0 / m, stat + (c * 8) as u64)
    }

    /// ∂z, and with batch norm the sums [Σ dh (= ∂β), Σ dh·x̂ (= ∂γ)] (2C f64) written to
    /// `dst` on the device, or to a new buffer that is returned when `dst` is None.
    fn epilogue_backward_to(
        &self,
        z: &DevTensor,
        dy: &DevTensor,
        softplus: bool,
        bn: Option<&BnTrainState<f32>>,
        dst: Option<u64>,
    ) -> Result<(DevTensor, Option<DevMem>)> {
        let s = z.shape;
        if dy.shape != s {
            return Err(Error::Shape(format!("epilogue backward: z {s}, dy {}", dy.shape)));
        }
        let c = s.c;
        if bn.is_some() && !matches!(c, 1 | 2 | 4 | 8 | 16) {
            return Err(Error::invalid(format!(
                "batch-norm gradient on the GPU needs 1, 2, 4, 8 or 16 channels, got {c}"
            )));
        }
        if c > 16 {
            return Err(Error::invalid(format!(
                "the GPU epilogue takes at most 16 channels, got {c}"
            )));
        }
        let count = s.len();
        let dz = self.tensor(s)?;
        let mut args = TrainArgs::default();
        args.inp[0] = z.ptr();
        args.inp[1] = dy.ptr();
        args.out[0] = dz.ptr();
        args.ca = c as i32;
        args.count = count as i64;
        args.mode = if softplus { 1 } else { 0 };
        match bn {
            Some(b) if b.resident != 0 => {
                // γ, β, mean, inv_std on the device (the resident batch norm's fold)
                args.wt = b.resident;
                args.mode |= 2;
            }
            Some(b) => {
                args.p = [
                    tl::channel_array(&b.gamma, c, 1.0),
                    tl::channel_array(&b.beta, c, 0.0),
                    tl::channel_array(&b.mean, c, 0.0),
                    tl::channel_array(&b.inv_std, c, 1.0),
                ];
                args.mode |= 2;
            }
            None => {
                args.p = [[1.0; 16], [0.0; 16], [0.0; 16], [1.0; 16]];
            }
        }
        if bn.is_none() {
            self.launch_1d("t_epi_bwd1", count, args)?;
            return Ok((dz, None));
        }
        let blocks = tl::reduction_blocks(count);
        let part = self.alloc(blocks * 2 * c * 8)?;
        let own = if dst.is_none() {
            Some(self.alloc(2 * c * 8)?)
        } else {
            None
        };
        let sums = dst.unwrap_or_else(|| own.as_ref().map_or(0, |m| m.ptr()));
        args.part = part.ptr();
        self.launch("t_epi_bwd1", (blocks as u32, 1, 1), 0, &args)?;
        self.reduce(&part, blocks, 2 * c, 1.0, sums)?;
        args.stat = sums;
        args.dc[0] = (s.n * s.spatial()) as f64;
        self.launch_1d("t_epi_bwd2", count, args)?;
        Ok((dz, own))
    }

    fn rl_pair(&self, name: &str, a: &DevTensor, t: &DevTensor, eps: f32) -> Result<DevTensor> {
        if a.shape != t.shape.with_c(1) {
            return Err(Error::Shape(format!("{name}: a {} vs {}", a.shape, t.shape)));
        }
        let out = self.tensor(a.shape)?;
        let mut args = TrainArgs::default();
        args.inp[0] = a.ptr();
        args.inp[1] = t.ptr();
        args.out[0] = out.ptr();
        args.ca = t.shape.c as i32;
        args.f[0] = eps;
        self.launch_1d(name, a.shape.len(), args)?;
        Ok(out)
    }

    fn rl_pair_backward(
        &self,
        name: &str,
        a: &DevTensor,
        t: &DevTensor,
        g: &DevTensor,
        eps: f32,
        mode: GradMode,
    ) -> Result<(DevTensor, DevTensor)> {
        if a.shape != t.shape.with_c(1) || g.shape != a.shape {
            return Err(Error::Shape(format!(
                "{name}: a {}, other {}, gradient {}",
                a.shape, t.shape, g.shape
            )));
        }
        let da = self.tensor(a.shape)?;
        let dt = self.tensor(t.shape)?;
        let mut args = TrainArgs::default();
        args.inp[0] = a.ptr();
        args.inp[1] = t.ptr();
        args.inp[2] = g.ptr();
        args.out[0] = da.ptr();
        args.out[1] = dt.ptr();
        args.ca = t.shape.c as i32;
        args.f[0] = eps;
        args.mode = match mode {
            GradMode::Exact => 0,
            GradMode::Paper => 1,
        };
        self.launch_1d(name, a.shape.len(), args)?;
        Ok((da, dt))
    }

    /// The loss's device part: the 7 sums (see [`loss_sums_at`]) and the gradient's 8
    /// constants into `stat` (`LOSS_SLOTS` f64 on the device), and ∂L/∂y, ∂L/∂E1r.
    fn loss_to(
        &self,
        y: &DevTensor,
        e1r: &DevTensor,
        x1: &DevTensor,
        g: &DevTensor,
        stat: u64,
    ) -> Result<(DevTensor, DevTensor)> {
        let s = g.shape;
        if y.shape != s || e1r.shape != s || x1.shape != s || s.c != 1 {
            return Err(Error::Shape(format!(
                "loss: shapes differ ({} {} {} {})",
                y.shape, e1r.shape, x1.shape, s
            )));
        }
        let count = s.len();
        let n = count as f64;
        let blocks = tl::reduction_blocks(count);
        let part = self.alloc(blocks * 5 * 8)?;
        let mut args = TrainArgs {
            inp: [y.ptr(), g.ptr(), e1r.ptr(), x1.ptr()],
            part: part.ptr(),
            stat,
            count: count as i64,
            ..TrainArgs::default()
        };
        self.launch("t_loss_sums", (blocks as u32, 1, 1), 0, &args)?;
        self.reduce(&part, blocks, 2, 1.0 / n, stat)?;
        args.mode = 1;
        self.launch("t_loss_sums", (blocks as u32, 1, 1), 0, &args)?;
        self.reduce(&part, blocks, 5, 1.0, stat + 16)?;
        let mut fin = TrainArgs {
            stat,
            ..TrainArgs::default()
        };
        fin.dc[0] = n;
        self.launch("t_loss_finish", (1, 1, 1), 0, &fin)?;
        let dy = self.tensor(s)?;
        let de = self.tensor(s)?;
        args.out[0] = dy.ptr();
        args.out[1] = de.ptr();
        args.stat = stat + 7 * 8;
        args.mode = 0;
        self.launch_1d("t_loss_grad", count, args)?;
        Ok((dy, de))
    }

    /// The loss terms from the sums a [`Self::loss_to`] left at f64 slot `slot` of `m`
    /// (one download: a synchronization).
    fn loss_terms_at(&self, m: &DevMem, slot: usize) -> Result<LossTerms> {
        let mut v = vec![0.0f64; LOSS_SLOTS];
        self.rt
            .dtoh(&mut v, m.ptr() + 8 * slot as u64)
            .map_err(|e| Error::Cuda(format!("copying the loss sums to the host: {e}")))?;
        Ok(loss_sums_at(&v).0)
    }

    /// mode 0 mirror pad, 1 crop, 2 uncrop with zeros: `out` of shape `os`, x its source.
    fn reshape(&self, x: &DevTensor, os: Shape, mode: i32) -> Result<DevTensor> {
        let s = x.shape;
        let out = self.tensor(os)?;
        let mut args = TrainArgs::default().dims(os);
        args.inp[0] = x.ptr();
        args.out[0] = out.ptr();
        args.ca = s.c as i32;
        args.mode = mode;
        args.k0 = s.d as i32;
        args.k1 = s.h as i32;
        args.k2 = s.w as i32;
        self.launch_1d("t_reshape", os.len(), args)?;
        Ok(out)
    }
}

impl Backend for CudaTrainBackend {
    type T = f32;
    type X = DevTensor;
    type Grads = train_params::DevGrads;
    type Opt = train_params::DevOpt;

    fn shape(&self, x: &DevTensor) -> Shape {
        x.shape
    }
    /// Uploads a host tensor (N×C×D×H×W) as channels-last.
    fn from_host(&self, t: &Tensor<f32>) -> Result<DevTensor> {
        self.rt.upload_tensor(t, Precision::F32)
    }
    /// Downloads a tensor to the host (N×C×D×H×W); waits for the device.
    fn to_host(&self, x: &DevTensor) -> Result<Tensor<f32>> {
        self.rt.download_tensor(x)
    }
    fn conv3(
        &self,
        inputs: &[&DevTensor],
        weight: &[f32],
        c_out: usize,
        epi: &Epilogue<'_, DevTensor, f32>,
    ) -> Result<DevTensor> {
        let cin: usize = inputs.iter().map(|t| t.shape.c).sum();
        if weight.len() != cin * 27 * c_out {
            return Err(Error::invalid(format!(
                "conv3 weight has {} values, expected {c_out}×{cin}×27",
                weight.len()
            )));
        }
        let mut args = TrainArgs::default();
        self.set_epilogue(&mut args, epi, inputs[0].shape.with_c(c_out))?;
        self.conv_packed(inputs, &tl::pack_fwd(weight, cin, c_out), c_out, args)
    }
    fn up2(
        &self,
        x: &DevTensor,
        weight: &[f32],
        c_out: usize,
        epi: &Epilogue<'_, DevTensor, f32>,
    ) -> Result<DevTensor> {
        up2_weight_fits(weight.len(), x.shape.c, c_out)?;
        let w = self.upload_f32(weight)?;
        self.up2_at(x, w.ptr(), c_out, epi)
    }
    fn epilogue(&self, z: &DevTensor, epi: &Epilogue<'_, DevTensor, f32>) -> Result<DevTensor> {
        self.epilogue_at(z, epi, 0)
    }
    fn conv3_w(
        &self,
        inputs: &[&DevTensor],
        w: LayerWeight<'_, Self>,
        c_out: usize,
        epi: &Epilogue<'_, DevTensor, f32>,
    ) -> Result<DevTensor> {
        match w.opt {
            Some(opt) => self.resident_conv3(inputs, w, opt, c_out, epi),
            None => self.conv3(inputs, w.host, c_out, epi),
        }
    }
    fn up2_w(
        &self,
        x: &DevTensor,
        w: LayerWeight<'_, Self>,
        c_out: usize,
        epi: &Epilogue<'_, DevTensor, f32>,
    ) -> Result<DevTensor> {
        match w.opt {
            Some(opt) => {
                up2_weight_fits(w.host.len(), x.shape.c, c_out)?;
                let wt = self.resident_weight(opt, w.layer, w.host.len())?;
                self.up2_at(x, wt, c_out, epi)
            }
            None => self.up2(x, w.host, c_out, epi),
        }
    }
    fn conv3_backward_data_w(
        &self,
        dz: &DevTensor,
        w: LayerWeight<'_, Self>,
        c_in: &[usize],
        needed: &[bool],
    ) -> Result<Vec<Option<DevTensor>>> {
        match w.opt {
            Some(opt) => {
                conv3_backward_fits(w.host.len(), dz.shape.c, c_in)?;
                self.resident_conv3_backward_data(dz, w, opt, c_in, needed)
            }
            None => self.conv3_backward_data(dz, w.host, c_in, needed),
        }
    }
    fn up2_backward_data_w(&self, dz: &DevTensor, w: LayerWeight<'_, Self>, c_in: usize) -> Result<DevTensor> {
        match w.opt {
            Some(opt) => {
                up2_backward_fits(w.host.len(), dz.shape, c_in)?;
                let wt = self.resident_weight(opt, w.layer, w.host.len())?;
                self.up2_backward_data_at(dz, wt, c_in)
            }
            None => self.up2_backward_data(dz, w.host, c_in),
        }
    }
    fn bn_train(
        &self,
        z: &DevTensor,
        layer: usize,
        gamma: &[f32],
        beta: &[f32],
        eps: f64,
        softplus: bool,
        addend: Addend<'_, DevTensor, f32>,
        opt: Option<&train_params::DevOpt>,
    ) -> Result<BnTrained<DevTensor, f32>> {
        match opt {
            Some(opt) => self.resident_bn_train(z, layer, eps, softplus, addend, opt),
            None => crate::backend::bn_train_composed(self, z, gamma, beta, eps, softplus, addend),
        }
    }
    fn loss_resident(
        &self,
        y: &DevTensor,
        e1r: &DevTensor,
        x1: &DevTensor,
        g: &DevTensor,
        opt: &train_params::DevOpt,
    ) -> Result<(Option<LossTerms>, DevTensor, DevTensor)> {
        self.resident_loss(y, e1r, x1, g, opt)
    }
    fn opt_step_queued(
        &self,
        opt: &mut train_params::DevOpt,
        grads: &train_params::DevGrads,
        stats: &[Option<ChannelStats>],
        _model: &mut Model<f32>,
    ) -> Result<Option<bool>> {
        self.resident_opt_step_queued(opt, grads, stats)
    }
    fn opt_poll(
        &self,
        opt: &mut train_params::DevOpt,
        model: &mut Model<f32>,
    ) -> Result<(Option<u64>, Option<LossTerms>)> {
        self.resident_opt_poll(opt, model)
    }
    fn opt_prepare(&self, opt: &train_params::DevOpt) -> Result<()> {
        self.resident_opt_prepare_ahead(opt)
    }
    fn opt_advance(&self, opt: &mut train_params::DevOpt) {
        self.resident_opt_advance(opt)
    }
    fn write_host(&self, dst: &mut DevTensor, t: &Tensor<f32>) -> Result<()> {
        if dst.shape != t.shape || dst.dtype() != Precision::F32 {
            return Err(Error::Shape(format!(
                "writing a host tensor {} into a device tensor {}",
                t.shape, dst.shape
            )));
        }
        self.rt.htod(dst.ptr(), &t.to_ndhwc())
    }
    fn write_host_staged(&self, slot: usize, dst: &mut DevTensor, t: &Tensor<f32>) -> Result<()> {
        if dst.shape != t.shape || dst.dtype() != Precision::F32 {
            return Err(Error::Shape(format!(
                "writing a host tensor {} into a device tensor {}",
                t.shape, dst.shape
            )));
        }
        self.rt.htod_staged(slot, dst.ptr(), &t.to_ndhwc())
    }
    fn staged_read(&self, slot: usize) -> Result<()> {
        self.rt.staged_read(slot)
    }
    fn records_graphs(&self) -> bool {
        self.graphs
    }
    fn capture_begin(&self) -> Result<bool> {
        if !self.graphs {
            return Ok(false);
        }
        self.rt.begin_capture()?;
        Ok(true)
    }
    fn capture_end(&self) -> Result<Box<dyn crate::backend::StepReplay>> {
        Ok(Box::new(self.rt.end_capture()?))
    }
    fn avgpool2(&self, x: &DevTensor) -> Result<DevTensor> {
        let s = x.shape;
        if s.d % 2 + s.h % 2 + s.w % 2 != 0 {
            return Err(Error::Shape(format!("avgpool2 needs even sizes, got {s}")));
        }
        let os = Shape::new(s.n, s.c, s.d / 2, s.h / 2, s.w / 2);
        let out = self.tensor(os)?;
        let mut args = TrainArgs::default().dims(os);
        args.inp[0] = x.ptr();
        args.out[0] = out.ptr();
        args.ca = s.c as i32;
        self.launch_1d("t_avgpool2", os.len(), args)?;
        Ok(out)
    }
    fn channel_mean(&self, x: &DevTensor) -> Result<DevTensor> {
        let out = self.tensor(x.shape.with_c(1))?;
        let mut args = TrainArgs::default().dims(x.shape);
        args.inp[0] = x.ptr();
        args.out[0] = out.ptr();
        args.ca = x.shape.c as i32;
        self.launch_1d("t_channel_mean", x.shape.n * x.shape.spatial(), args)?;
        Ok(out)
    }
    /// Per-channel Σx and Σ(x − mean)² of a tensor whose channel count is a power of two
    /// ≤ 16, reduced on the device: [mean (C), biased variance (C)].
    fn batch_stats(&self, z: &DevTensor) -> Result<ChannelStats> {
        let s = z.shape;
        let c = s.c;
        if !matches!(c, 1 | 2 | 4 | 8 | 16) {
            // the device reduction fixes one channel per thread: other counts on the host
            return Ok(pointwise::batch_stats(&self.to_host(z)?));
        }
        let stat = self.alloc(2 * c * 8)?;
        self.batch_stats_to(z, stat.ptr())?;
        let v = self.download_f64(&stat, 2 * c, "batch statistics")?;
        Ok(ChannelStats {
            mean: v[..c].to_vec(),
            var: v[c..].to_vec(),
        })
    }
    fn rl_divide(&self, a: &DevTensor, fp: &DevTensor, eps: f64) -> Result<DevTensor> {
        self.rl_pair("t_rl_divide", a, fp, eps as f32)
    }
    fn rl_update(&self, a: &DevTensor, bp: &DevTensor) -> Result<DevTensor> {
        self.rl_pair("t_rl_update", a, bp, 0.0)
    }
    /// The loss of spec §5: sums on the device (two passes, f64), the gradient's constants
    /// and the gradients there too (no host round trip in between); the terms from the
    /// sums, downloaded.
    fn loss(
        &self,
        y: &DevTensor,
        e1r: &DevTensor,
        x1: &DevTensor,
        g: &DevTensor,
    ) -> Result<(LossTerms, DevTensor, DevTensor)> {
        let stat = self.zeros_f64(LOSS_SLOTS)?;
        let (dy, de) = self.loss_to(y, e1r, x1, g, stat.ptr())?;
        Ok((self.loss_terms_at(&stat, 0)?, dy, de))
    }
    fn epilogue_backward(
        &self,
        z: &DevTensor,
        dy: &DevTensor,
        softplus: bool,
        bn: Option<&BnTrainState<f32>>,
    ) -> Result<(DevTensor, Vec<f64>, Vec<f64>)> {
        let (dz, sums) = self.epilogue_backward_to(z, dy, softplus, bn, None)?;
        let Some(sums) = sums else {
            return Ok((dz, vec![], vec![]));
        };
        let c = z.shape.c;
        let v = self.download_f64(&sums, 2 * c, "batch-norm gradients")?;
        // (∂z, ∂γ = Σ dh·x̂, ∂β = Σ dh)
        Ok((dz, v[c..].to_vec(), v[..c].to_vec()))
    }
    fn conv3_backward_data(
        &self,
        dz: &DevTensor,
        weight: &[f32],
        c_in: &[usize],
        needed: &[bool],
    ) -> Result<Vec<Option<DevTensor>>> {
        let c_out = dz.shape.c;
        let c_total: usize = c_in.iter().sum();
        conv3_backward_fits(weight.len(), c_out, c_in)?;
        self.per_input_slice(c_in, needed, |offset, cs, args| {
            let wt = tl::flip_transpose(weight, c_total, c_out, offset, cs);
            self.conv_packed(&[dz], &tl::pack_fwd(&wt, c_out, cs), cs, args)
        })
    }
    fn conv3_backward_weight(&self, inputs: &[&DevTensor], dz: &DevTensor) -> Result<Vec<f64>> {
        let (part, blocks, nw) = self.conv3_wgrad_partials(inputs, dz)?;
        let dw = self.alloc(nw * 8)?;
        self.reduce(&part, blocks, nw, 1.0, dw.ptr())?;
        self.download_f64(&dw, nw, "the conv weight gradient")
    }
    fn up2_backward_data(&self, dz: &DevTensor, weight: &[f32], c_in: usize) -> Result<DevTensor> {
        up2_backward_fits(weight.len(), dz.shape, c_in)?;
        let w = self.upload_f32(weight)?;
        self.up2_backward_data_at(dz, w.ptr(), c_in)
    }
    fn up2_backward_weight(&self, x: &DevTensor, dz: &DevTensor) -> Result<Vec<f64>> {
        let (part, chunks, nw) = self.up2_wgrad_partials(x, dz)?;
        let dw = self.alloc(nw * 8)?;
        self.reduce(&part, chunks, nw, 1.0, dw.ptr())?;
        self.download_f64(&dw, nw, "the up2 weight gradient")
    }
    fn rl_divide_backward(
        &self,
        a: &DevTensor,
        fp: &DevTensor,
        eps: f64,
        dq: &DevTensor,
        mode: GradMode,
    ) -> Result<(DevTensor, DevTensor)> {
        self.rl_pair_backward("t_rl_divide_bwd", a, fp, dq, eps as f32, mode)
    }
    fn rl_update_backward(
        &self,
        a: &DevTensor,
        bp: &DevTensor,
        de: &DevTensor,
        mode: GradMode,
    ) -> Result<(DevTensor, DevTensor)> {
        self.rl_pair_backward("t_rl_update_bwd", a, bp, de, 0.0, mode)
    }
    fn channel_mean_backward(&self, dy: &DevTensor, channels: usize) -> Result<DevTensor> {
        let out = self.tensor(dy.shape.with_c(channels))?;
        let mut args = TrainArgs::default();
        args.inp[0] = dy.ptr();
        args.out[0] = out.ptr();
        args.ca = channels as i32;
        self.launch_1d("t_channel_mean_bwd", out.shape.len(), args)?;
        Ok(out)
    }
    fn accumulate(&self, acc: &mut DevTensor, t: &DevTensor) -> Result<()> {
        if acc.shape != t.shape {
            return Err(Error::Shape(format!("accumulate: {} vs {}", acc.shape, t.shape)));
        }
        let mut args = TrainArgs::default();
        args.inp[0] = t.ptr();
        args.out[0] = acc.ptr();
        self.launch_1d("t_accumulate", t.shape.len(), args)
    }
    fn grads_new(&self, variant: Variant) -> Result<train_params::DevGrads> {
        self.resident_grads(variant)
    }
    fn epilogue_backward_into(
        &self,
        z: &DevTensor,
        dy: &DevTensor,
        softplus: bool,
        bn: Option<&BnTrainState<f32>>,
        grads: &mut train_params::DevGrads,
        layer: usize,
    ) -> Result<DevTensor> {
        self.resident_epilogue_backward(z, dy, softplus, bn, grads, layer)
    }
    fn conv3_backward_weight_into(
        &self,
        inputs: &[&DevTensor],
        dz: &DevTensor,
        grads: &mut train_params::DevGrads,
        layer: usize,
    ) -> Result<()> {
        self.resident_conv3_wgrad(inputs, dz, grads, layer)
    }
    fn up2_backward_weight_into(
        &self,
        x: &DevTensor,
        dz: &DevTensor,
        grads: &mut train_params::DevGrads,
        layer: usize,
    ) -> Result<()> {
        self.resident_up2_wgrad(x, dz, grads, layer)
    }
    fn opt_new(&self, model: &Model<f32>, adam: &Adam) -> Result<train_params::DevOpt> {
        self.resident_opt_new(model, adam)
    }
    fn opt_step(
        &self,
        opt: &mut train_params::DevOpt,
        grads: &train_params::DevGrads,
        stats: &[Option<ChannelStats>],
        model: &mut Model<f32>,
    ) -> Result<bool> {
        self.resident_opt_step(opt, grads, stats, model)
    }
    fn opt_download(&self, opt: &train_params::DevOpt, model: &mut Model<f32>) -> Result<Adam> {
        self.resident_opt_download(opt, model)
    }
    fn pad_even(&self, x: &DevTensor) -> Result<DevTensor> {
        let s = x.shape;
        let e = |v: usize| v + v % 2;
        self.reshape(x, Shape::new(s.n, s.c, e(s.d), e(s.h), e(s.w)), 0)
    }
    fn crop(&self, x: &DevTensor, shape: Shape) -> Result<DevTensor> {
        let s = x.shape;
        if !(shape.n == s.n && shape.c == s.c && shape.d <= s.d && shape.h <= s.h && shape.w <= s.w) {
            return Err(Error::Shape(format!("crop {s} to {shape}: the target must fit inside")));
        }
        self.reshape(x, shape, 1)
    }
    fn uncrop_zeros(&self, x: &DevTensor, shape: Shape) -> Result<DevTensor> {
        let s = x.shape;
        if !(shape.n == s.n && shape.c == s.c && shape.d >= s.d && shape.h >= s.h && shape.w >= s.w) {
            return Err(Error::Shape(format!(
                "uncrop {s} to {shape}: the target must contain it"
            )));
        }
        self.reshape(x, shape, 2)
    }
}
