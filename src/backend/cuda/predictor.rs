//! [`CudaPredictor`]: the device side of streaming inference. A stream of tiles runs
//! with two buffer slots: while tile k computes on the compute stream, tile k+1 is copied
//! in on the host→device stream and tile k−1's result out on the device→host stream,
//! through page-locked host buffers. The forward pass itself is the caller's (the
//! network of `net`, `Rln::infer` on the [`CudaInferBackend`] this predictor holds: the
//! infer layer implements `TilePredictor` with it), so this file knows no network.
//!
//! Nothing is allocated per tile but what the network's stages take from the runtime's
//! stream-ordered pool (memory the previous tile returned): the page-locked buffers, the
//! device input slots, the device staging of f16 tiles and the host copy of a result are
//! grown when a larger tile comes and reused otherwise (the pipeline crops the result
//! from a borrowed tensor). Odd sizes are mirror-padded straight into the page-locked
//! buffer, and a dual-view tile's channels are interleaved there (the device layout is
//! channels-last). With f16 storage (`--fp16`) tiles travel as f16 bits (half the bytes
//! over PCIe): converted on the host with every core, and between f16 and the network's
//! f32 input/output on the device (kernels/io_half.cu).

use super::device::{CuCheck, CudaDevice, PinnedBuf};
use super::infer::{bytes_per_voxel, CudaInferBackend};
use super::launch::{TO_F16_KERNEL, TO_F32_KERNEL};
use super::runtime::{DevMem, DevTensor, IoArgs, Launch, Params, Runtime};
use super::{CudaOptions, Precision};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::{Shape, Tensor};
use cudarc::driver::CudaEvent;
use rayon::prelude::*;
use std::sync::Arc;

/// Device memory kept free for the driver, kernels' stacks and fragmentation.
const RESERVE_BYTES: usize = 512 << 20;
/// Largest tile the budget allows, in voxels (512³): the GPU is saturated long before
/// (at ~128³), and bigger tiles only grow the host's pinned staging buffers and the
/// stitcher's tile copies.
const MAX_TILE_VOXELS: usize = 1 << 27;
/// Elements per host conversion / copy task.
const CHUNK: usize = 1 << 18;

/// The device buffers the f16 tiles land in, per slot (converted by kernels/io_half.cu).
struct HalfIo {
    dev_in: [Option<DevMem>; 2],
    dev_out: [Option<DevMem>; 2],
}

/// The forward pass a stream runs on each tile: the (even-sized, f32) input tile on the
/// device → the prediction (one channel, f32), on the backend's compute stream.
pub type DeviceForward<'f> = dyn FnMut(&CudaInferBackend, &DevTensor) -> Result<DevTensor> + 'f;

/// Where a stream hands each tile: its input (back, for reuse) and its prediction (lent).
pub type TileSink<'s> = dyn FnMut(Tensor<f32>, &Tensor<f32>) -> Result<()> + 's;

/// Streams tiles through the device with double-buffered transfers.
pub struct CudaPredictor {
    dev: Arc<CudaDevice>,
    b: CudaInferBackend,
    /// The device input of each slot (reused; grown for a larger tile).
    x_dev: [Option<DevMem>; 2],
    /// Page-locked staging per slot: f32 values, or (f16 travel) f16 bits packed two
    /// per f32 element.
    pinned_in: [Option<PinnedBuf>; 2],
    pinned_out: [Option<PinnedBuf>; 2],
    /// Per slot: input copied in, forward done, output copied out.
    ev_in: [CudaEvent; 2],
    ev_done: [CudaEvent; 2],
    ev_out: [CudaEvent; 2],
    /// Some when tiles travel as f16 (f16 storage).
    half: Option<HalfIo>,
    /// The host copy of a result handed to the sink (reused).
    host_out: Vec<f32>,
}

/// A tile in flight: its slot and its shapes before and after padding.
struct InFlight {
    slot: usize,
    /// The prediction on the device until its copy to the host is done (f32 travel).
    _y: Option<DevTensor>,
    /// The input, handed back with its prediction so the caller reuses its buffer.
    input: Tensor<f32>,
    padded: Shape,
}

impl CudaPredictor {
    /// Opens device `opts.device` and uploads the model.
    pub fn new(model: &Model<f32>, opts: CudaOptions) -> Result<Self> {
        Self::with_device(CudaDevice::open(opts.device)?, model, opts)
    }

    pub fn with_device(dev: Arc<CudaDevice>, model: &Model<f32>, opts: CudaOptions) -> Result<Self> {
        let ev = || -> Result<[CudaEvent; 2]> { Ok([dev.event(false)?, dev.event(false)?]) };
        let (ev_in, ev_done, ev_out) = (ev()?, ev()?, ev()?);
        let half = opts.is_f16().then(|| HalfIo {
            dev_in: [None, None],
            dev_out: [None, None],
        });
        let b = CudaInferBackend::new(dev.clone(), model, opts)?;
        Ok(CudaPredictor {
            dev,
            b,
            x_dev: [None, None],
            pinned_in: [None, None],
            pinned_out: [None, None],
            ev_in,
            ev_done,
            ev_out,
            half,
            host_out: Vec::new(),
        })
    }

    /// The inference backend the tiles run on.
    pub fn backend(&self) -> &CudaInferBackend {
        &self.b
    }

    /// The device and the precision, e.g. "NVIDIA H100 … f16-tc".
    pub fn describe(&self) -> String {
        format!("{} {}", self.dev.describe(), self.b.opts.label())
    }

    /// Device bytes a tile needs per (padded) voxel: the network's peak, plus ~10% for
    /// the padding of odd sizes, plus the two slots' f16 input and output staging when
    /// tiles travel as f16.
    pub fn bytes_per_voxel(&self) -> usize {
        let c_in = self.b.model().config.variant.input_channels();
        let staging = if self.half.is_some() { 2 * 2 * (c_in + 1) } else { 0 };
        (bytes_per_voxel(self.b.opts.precision, c_in) + staging) * 11 / 10 + 1
    }

    /// Free device memory plus what this predictor's buffers already hold (reused),
    /// minus a reserve, and no more than a MAX_TILE_VOXELS tile needs.
    pub fn memory_budget(&self) -> Option<usize> {
        // memory the pool keeps from freed buffers counts as free
        self.b.runtime().trim().ok()?;
        let (free, _) = self.dev.mem_info().ok()?;
        let staged = self.half.iter().flat_map(|h| h.dev_in.iter().chain(&h.dev_out));
        let held: usize = self.x_dev.iter().chain(staged).flatten().map(|m| m.bytes()).sum();
        let device = (free + held).saturating_sub(RESERVE_BYTES);
        Some(device.min(MAX_TILE_VOXELS * self.bytes_per_voxel()))
    }

    /// f32 elements of page-locked staging for a tile of `voxels` voxels.
    fn staging_len(&self, voxels: usize) -> usize {
        if self.half.is_some() {
            voxels.div_ceil(2)
        } else {
            voxels
        }
    }

    fn pinned(slot: &mut Option<PinnedBuf>, dev: &CudaDevice, len: usize) -> Result<()> {
        if slot.as_ref().is_none_or(|b| b.len() < len) {
            *slot = None; // the slot's previous copy has completed (see predict_stream)
            *slot = Some(dev.alloc_pinned(len)?);
        }
        Ok(())
    }

    fn dev_buf(slot: &mut Option<DevMem>, rt: &Arc<Runtime>, bytes: usize) -> Result<u64> {
        if slot.as_ref().is_none_or(|b| b.bytes() < bytes) {
            // queued work of an earlier tile may still read the old buffer
            rt.synchronize_device()?;
            *slot = None;
            *slot = Some(rt.alloc(bytes)?);
            // the allocation is ordered on the compute stream; the copy stream uses it next
            rt.synchronize()?;
        }
        Ok(slot.as_ref().expect("allocated above").ptr())
    }

    /// Launches one of the conversion kernels on the compute stream over `n` elements.
    fn convert(rt: &Runtime, name: &str, src: u64, dst: u64, n: usize, what: &str) -> Result<()> {
        let threads = super::launch::ELEMENTWISE_THREADS;
        let blocks = n.div_ceil(threads as usize).clamp(1, 65_535 * 4) as u32;
        rt.launch(&Launch {
            name,
            grid: (blocks, 1, 1),
            block: threads,
            smem: 0,
            params: Params::Io(&IoArgs { src, dst, n: n as i64 }),
        })
        .map_err(|e| e.context(format!("the {what} conversion")))
    }

    /// Waits for `t`'s result, crops it into the reused host buffer and hands it to `sink`.
    fn finish(&mut self, t: InFlight, sink: &mut TileSink<'_>) -> Result<()> {
        self.ev_out[t.slot]
            .synchronize()
            .check("waiting for a tile's forward pass and its copy to the host")?;
        let shape = t.input.shape.with_c(1);
        let mut out = std::mem::take(&mut self.host_out);
        out.clear();
        out.resize(shape.len(), 0.0);
        let pinned = self.pinned_out[t.slot].as_ref().expect("slot in use").as_slice();
        let as_f16 = self.half.is_some();
        let p = t.padded;
        let row = |dst: &mut [f32], k: usize| {
            // output row k (n, d, h) of the cropped shape ← the padded row
            let (h, rest) = (k % shape.h, k / shape.h);
            let (d, n) = (rest % shape.d, rest / shape.d);
            let src = ((n * p.d + d) * p.h + h) * p.w;
            if as_f16 {
                let bits: &[u16] = bytemuck::cast_slice(pinned);
                for (o, &b) in dst.iter_mut().zip(&bits[src..src + shape.w]) {
                    *o = half::f16::from_bits(b).to_f32();
                }
            } else {
                dst.copy_from_slice(&pinned[src..src + shape.w]);
            }
        };
        let rows_per_task = (CHUNK / shape.w.max(1)).max(1);
        out.par_chunks_mut(rows_per_task * shape.w)
            .enumerate()
            .for_each(|(i, c)| {
                for (j, r) in c.chunks_mut(shape.w).enumerate() {
                    row(r, i * rows_per_task + j);
                }
            });
        let y = Tensor::from_vec(shape, out)?;
        let r = sink(t.input, &y);
        self.host_out = y.data;
        r
    }
}

/// Writes `x` (N×C×D×H×W) mirror-padded to `p` (even sizes, C channels; the same values
/// as `pointwise::pad_even`) into `dst` channels-last (the device layout; for one channel
/// the same order), as f32 or as f16 bits, with every core.
fn stage(x: &Tensor<f32>, p: Shape, dst: &mut [f32], as_f16: bool) {
    let s = x.shape;
    let c = s.c;
    let mirror = |i: usize, n: usize| if i < n { i } else { 2 * n - 1 - i };
    // the source of padded row k = (n, d, h) in channel ch
    let src_row = |k: usize, ch: usize| {
        let (h, rest) = (k % p.h, k / p.h);
        let (d, n) = (rest % p.d, rest / p.d);
        (((n * c + ch) * s.d + mirror(d, s.d)) * s.h + mirror(h, s.h)) * s.w
    };
    let row_len = p.w * c;
    let rows_per_task = (CHUNK / row_len.max(1)).max(1);
    let len = p.len();
    // one padded row, channels interleaved, as `put(index, value)`
    let fill = |k: usize, put: &mut dyn FnMut(usize, f32)| {
        for ch in 0..c {
            let src = &x.data[src_row(k, ch)..][..s.w];
            for w in 0..p.w {
                put(w * c + ch, src[mirror(w, s.w)]);
            }
        }
    };
    if as_f16 && c == 1 {
        let bits: &mut [u16] = bytemuck::cast_slice_mut(dst);
        bits[..len]
            .par_chunks_mut(rows_per_task * p.w)
            .enumerate()
            .for_each(|(i, chunk)| {
                for (j, r) in chunk.chunks_mut(p.w).enumerate() {
                    let src = &x.data[src_row(i * rows_per_task + j, 0)..][..s.w];
                    for (w, o) in r.iter_mut().enumerate() {
                        *o = half::f16::from_f32(src[mirror(w, s.w)]).to_bits();
                    }
                }
            });
    } else if as_f16 {
        let bits: &mut [u16] = bytemuck::cast_slice_mut(dst);
        bits[..len]
            .par_chunks_mut(rows_per_task * row_len)
            .enumerate()
            .for_each(|(i, chunk)| {
                for (j, r) in chunk.chunks_mut(row_len).enumerate() {
                    fill(i * rows_per_task + j, &mut |at, v| {
                        r[at] = half::f16::from_f32(v).to_bits()
                    });
                }
            });
    } else if c == 1 {
        dst[..len]
            .par_chunks_mut(rows_per_task * p.w)
            .enumerate()
            .for_each(|(i, chunk)| {
                for (j, r) in chunk.chunks_mut(p.w).enumerate() {
                    let src = &x.data[src_row(i * rows_per_task + j, 0)..][..s.w];
                    r[..s.w].copy_from_slice(src);
                    if p.w > s.w {
                        r[s.w] = src[s.w - 1];
                    }
                }
            });
    } else {
        dst[..len]
            .par_chunks_mut(rows_per_task * row_len)
            .enumerate()
            .for_each(|(i, chunk)| {
                for (j, r) in chunk.chunks_mut(row_len).enumerate() {
                    fill(i * rows_per_task + j, &mut |at, v| r[at] = v);
                }
            });
    }
}

impl CudaPredictor {
    /// Streams `tiles` (N×C_in×D×H×W, any sizes) through `forward` on the device, handing
    /// each input and its prediction to `sink` in order, with the transfers of one tile
    /// overlapping the compute of the previous one.
    pub fn predict_stream_with(
        &mut self,
        tiles: &mut dyn Iterator<Item = Result<Tensor<f32>>>,
        sink: &mut TileSink<'_>,
        forward: &mut DeviceForward<'_>,
    ) -> Result<()> {
        let dev = self.dev.clone();
        let rt = self.b.runtime().clone();
        let c_in = self.b.model().config.variant.input_channels();
        let mut prev: Option<InFlight> = None;
        let mut slot = 0;
        for t in tiles {
            let x = t?;
            if x.shape.c != c_in {
                return Err(Error::Shape(format!(
                    "the model takes {c_in} input channel(s); the tile is {}",
                    x.shape
                )));
            }
            // odd sizes are mirror-padded to even while staging
            let s = x.shape;
            let e = |v: usize| v + v % 2;
            let ps = Shape::new(s.n, c_in, e(s.d), e(s.h), e(s.w));
            let (len_in, len_out) = (ps.len(), ps.with_c(1).len());
            // This slot's last use (tile k−2) is complete: its result was synchronized in
            // `finish` during the previous iteration, and that copy followed its forward
            // pass and its input copy. So its pinned and device buffers are free.
            let (staged_in, staged_out) = (self.staging_len(len_in), self.staging_len(len_out));
            Self::pinned(&mut self.pinned_in[slot], &dev, staged_in)?;
            Self::pinned(&mut self.pinned_out[slot], &dev, staged_out)?;
            let xb = Self::dev_buf(&mut self.x_dev[slot], &rt, len_in * 4)?;
            let as_f16 = self.half.is_some();
            let pin_in = self.pinned_in[slot].as_mut().expect("allocated above");
            stage(&x, ps, pin_in.as_mut_slice(), as_f16);
            let y_keep = match &mut self.half {
                Some(h) => {
                    let xh = Self::dev_buf(&mut h.dev_in[slot], &rt, len_in * 2)?;
                    let yh = Self::dev_buf(&mut h.dev_out[slot], &rt, len_out * 2)?;
                    let bits: &[u16] = bytemuck::cast_slice(pin_in.as_slice());
                    dev.copy_htod(&dev.h2d, xh, &bits[..len_in], "an input tile (f16)")?;
                    self.ev_in[slot].record(&dev.h2d).check("recording an event")?;
                    dev.compute
                        .wait(&self.ev_in[slot])
                        .check("ordering the forward pass after its input copy")?;
                    Self::convert(&rt, TO_F32_KERNEL, xh, xb, len_in, "f16 → f32 input")?;
                    let y = Self::run(&self.b, &mut self.x_dev[slot], ps, forward)?;
                    Self::convert(&rt, TO_F16_KERNEL, y.ptr(), yh, len_out, "f32 → f16 output")?;
                    drop(y); // freed in stream order, after the conversion
                    self.ev_done[slot].record(&dev.compute).check("recording an event")?;
                    dev.d2h
                        .wait(&self.ev_done[slot])
                        .check("ordering the output copy after the forward pass")?;
                    let pin_out = self.pinned_out[slot].as_mut().expect("allocated above");
                    let bits: &mut [u16] = bytemuck::cast_slice_mut(pin_out.as_mut_slice());
                    dev.copy_dtoh(&dev.d2h, &mut bits[..len_out], yh, "a predicted tile (f16)")?;
                    None
                }
                None => {
                    dev.copy_htod(&dev.h2d, xb, &pin_in.as_slice()[..len_in], "an input tile")?;
                    self.ev_in[slot].record(&dev.h2d).check("recording an event")?;
                    dev.compute
                        .wait(&self.ev_in[slot])
                        .check("ordering the forward pass after its input copy")?;
                    let y = Self::run(&self.b, &mut self.x_dev[slot], ps, forward)?;
                    self.ev_done[slot].record(&dev.compute).check("recording an event")?;
                    dev.d2h
                        .wait(&self.ev_done[slot])
                        .check("ordering the output copy after the forward pass")?;
                    let pin_out = self.pinned_out[slot].as_mut().expect("allocated above");
                    dev.copy_dtoh(
                        &dev.d2h,
                        &mut pin_out.as_mut_slice()[..len_out],
                        y.ptr(),
                        "a predicted tile",
                    )?;
                    // kept until the copy is done (freed after `finish` waited for it)
                    Some(y)
                }
            };
            self.ev_out[slot].record(&dev.d2h).check("recording an event")?;
            // while tile k runs, hand out tile k−1
            if let Some(p) = prev.take() {
                self.finish(p, sink)?;
            }
            prev = Some(InFlight {
                slot,
                _y: y_keep,
                input: x,
                padded: ps,
            });
            slot ^= 1;
        }
        if let Some(p) = prev {
            self.finish(p, sink)?;
        }
        Ok(())
    }

    /// Enqueues `forward` on the slot's input (`ps`, f32) and returns the prediction; the
    /// slot's buffer goes back to the slot.
    fn run(
        b: &CudaInferBackend,
        slot: &mut Option<DevMem>,
        ps: Shape,
        forward: &mut DeviceForward<'_>,
    ) -> Result<DevTensor> {
        let mem = slot.take().expect("the slot's input buffer is allocated");
        let x = DevTensor::in_mem(mem, ps, Precision::F32)?;
        let y = forward(b, &x);
        *slot = Some(x.into_mem());
        let y = y?;
        if y.shape() != ps.with_c(1) || y.dtype() != Precision::F32 {
            return Err(Error::Shape(format!(
                "the forward pass returned {} ({:?}) for a {ps} tile",
                y.shape(),
                y.dtype()
            )));
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::pointwise;

    /// The host staging pads exactly like `pad_even` (f32) and lays the channels out
    /// like the device (channels-last), and the f16 staging is its f16 rounding; one and
    /// two (dual-view) channels.
    #[test]
    fn staging_pads_like_pad_even_in_f32_and_f16() {
        for (c, dims) in [1, 2]
            .into_iter()
            .flat_map(|c| [(2usize, 4usize, 6usize, 8usize), (1, 3, 5, 7), (2, 5, 4, 3)].map(|d| (c, d)))
        {
            let s = Shape::new(dims.0, c, dims.1, dims.2, dims.3);
            let x = Tensor::from_vec(s, (0..s.len()).map(|i| (i as f32 * 0.37).sin() * 3.0).collect()).unwrap();
            let padded = pointwise::pad_even(&x);
            let p = padded.shape;
            let want = Tensor::from_vec(p, padded.to_ndhwc()).unwrap();
            let mut buf = vec![f32::NAN; p.len()];
            stage(&x, p, &mut buf, false);
            assert_eq!(buf, want.data, "{s}");
            let mut buf = vec![0.0f32; p.len().div_ceil(2)];
            stage(&x, p, &mut buf, true);
            let bits: &[u16] = bytemuck::cast_slice(&buf);
            for (i, (&b, &w)) in bits.iter().zip(&want.data).enumerate() {
                assert_eq!(b, half::f16::from_f32(w).to_bits(), "{s} at {i}");
            }
        }
    }
}
