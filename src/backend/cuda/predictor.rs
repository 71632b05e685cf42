//! [`CudaPredictor`]: the CUDA network as a [`TilePredictor`]. A stream of tiles runs
//! with two buffer slots: while tile k computes on the compute stream, tile k+1 is copied
//! in on the host→device stream and tile k−1's result out on the device→host stream,
//! through page-locked host buffers.

use super::device::{CuCheck, CudaDevice, PinnedBuf};
use super::forward::{workspace_bytes_per_voxel, CudaNet};
use super::CudaOptions;
use crate::backend::cpu::pointwise;
use crate::error::{Error, Result};
use crate::infer::TilePredictor;
use crate::model::Model;
use crate::tensor::{Shape, Tensor};
use cudarc::driver::CudaEvent;
use std::sync::Arc;

/// Device memory kept free for the driver, kernels' stacks and fragmentation.
const RESERVE_BYTES: usize = 512 << 20;
/// Largest tile the budget allows, in voxels (512³): the GPU is saturated long before
/// (at ~128³), and bigger tiles only grow the host's pinned staging buffers and the
/// stitcher's tile copies.
const MAX_TILE_VOXELS: usize = 1 << 27;

pub struct CudaPredictor {
    net: CudaNet,
    pinned_in: [Option<PinnedBuf>; 2],
    pinned_out: [Option<PinnedBuf>; 2],
    /// Per slot: input copied in, forward done, output copied out.
    ev_in: [CudaEvent; 2],
    ev_done: [CudaEvent; 2],
    ev_out: [CudaEvent; 2],
}

/// A tile in flight: its slot and its shapes before and after padding.
struct InFlight {
    slot: usize,
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
        let net = CudaNet::new(dev, model, opts)?;
        Ok(CudaPredictor {
            net,
            pinned_in: [None, None],
            pinned_out: [None, None],
            ev_in,
            ev_done,
            ev_out,
        })
    }

    pub fn net(&mut self) -> &mut CudaNet {
        &mut self.net
    }

    fn pinned(slot: &mut Option<PinnedBuf>, dev: &CudaDevice, len: usize) -> Result<()> {
        if slot.as_ref().is_none_or(|b| b.len() < len) {
            *slot = None; // the slot's previous copy has completed (see predict_stream)
            *slot = Some(dev.alloc_pinned(len)?);
        }
        Ok(())
    }

    /// Waits for `t`'s result, crops it and hands it to `sink`.
    fn finish(&mut self, t: InFlight, sink: &mut dyn FnMut(Tensor<f32>, Tensor<f32>) -> Result<()>) -> Result<()> {
        self.ev_out[t.slot]
            .synchronize()
            .check("waiting for a tile's forward pass and its copy to the host")?;
        let src = &self.pinned_out[t.slot].as_ref().expect("slot in use").as_slice()[..t.padded.len()];
        let y = Tensor::from_vec(t.padded, par_copy(src))?;
        let shape = t.input.shape.with_c(1);
        if t.padded == shape {
            sink(t.input, y)
        } else {
            sink(t.input, pointwise::crop(&y, shape))
        }
    }
}

impl TilePredictor for CudaPredictor {
    fn describe(&self) -> String {
        format!("{} {}", self.net.dev.describe(), self.net.opts.label())
    }

    fn predict(&mut self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        Ok(self.net.predict_host(x, false)?.prediction)
    }

    fn bytes_per_voxel(&self) -> usize {
        // the workspace, plus ~10% for the padding of odd sizes
        workspace_bytes_per_voxel(self.net.opts.precision) * 11 / 10 + 1
    }

    fn memory_budget(&self) -> Option<usize> {
        // free memory plus what the workspace already holds (it is reused), minus a
        // reserve, and no more than a MAX_TILE_VOXELS tile needs
        let (free, _) = self.net.dev.mem_info().ok()?;
        let device = (free + self.net.workspace_bytes()).saturating_sub(RESERVE_BYTES);
        Some(device.min(MAX_TILE_VOXELS * self.bytes_per_voxel()))
    }

    fn predict_stream(
        &mut self,
        tiles: &mut dyn Iterator<Item = Result<Tensor<f32>>>,
        sink: &mut dyn FnMut(Tensor<f32>, Tensor<f32>) -> Result<()>,
    ) -> Result<()> {
        let dev = self.net.dev.clone();
        let mut prev: Option<InFlight> = None;
        let mut slot = 0;
        for t in tiles {
            let x = t?;
            if x.shape.c != 1 {
                return Err(Error::Shape(format!(
                    "the CUDA network takes one input channel; the tile is {}",
                    x.shape
                )));
            }
            // mirror-pad odd sizes; even tiles go to the device as they are
            let even = x.shape.d % 2 == 0 && x.shape.h % 2 == 0 && x.shape.w % 2 == 0;
            let padded;
            let xp = if even {
                &x
            } else {
                padded = pointwise::pad_even(&x);
                &padded
            };
            let ps = xp.shape;
            let len = ps.len();
            // This slot's last use (tile k−2) is complete: its result was synchronized in
            // `finish` during the previous iteration, and that copy followed its forward
            // pass and its input copy. So its pinned and device buffers are free.
            Self::pinned(&mut self.pinned_in[slot], &dev, len)?;
            Self::pinned(&mut self.pinned_out[slot], &dev, len)?;
            let (xb, yb) = self.net.io_buffers(slot, len)?;
            let pin_in = self.pinned_in[slot].as_mut().expect("allocated above");
            par_copy_into(&mut pin_in.as_mut_slice()[..len], &xp.data);
            dev.copy_htod(&dev.h2d, xb, &pin_in.as_slice()[..len], "an input tile")?;
            self.ev_in[slot].record(&dev.h2d).check("recording an event")?;
            dev.compute
                .wait(&self.ev_in[slot])
                .check("ordering the forward pass after its input copy")?;
            self.net.forward_device(xb, yb, [ps.n, ps.d, ps.h, ps.w], None)?;
            self.ev_done[slot].record(&dev.compute).check("recording an event")?;
            dev.d2h
                .wait(&self.ev_done[slot])
                .check("ordering the output copy after the forward pass")?;
            let pin_out = self.pinned_out[slot].as_mut().expect("allocated above");
            dev.copy_dtoh(&dev.d2h, &mut pin_out.as_mut_slice()[..len], yb, "a predicted tile")?;
            self.ev_out[slot].record(&dev.d2h).check("recording an event")?;
            // while tile k runs, hand out tile k−1
            if let Some(p) = prev.take() {
                self.finish(p, sink)?;
            }
            prev = Some(InFlight {
                slot,
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
}

/// Copies large buffers with every core: one thread's memcpy is far slower than the
/// PCIe link, and the tiles are hundreds of megabytes.
fn par_copy_into(dst: &mut [f32], src: &[f32]) {
    use rayon::prelude::*;
    dst.par_chunks_mut(1 << 18)
        .zip(src.par_chunks(1 << 18))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

fn par_copy(src: &[f32]) -> Vec<f32> {
    let mut v = vec![0.0f32; src.len()];
    par_copy_into(&mut v, src);
    v
}
