//! Inference on volumes of any size: the engines that predict one tile, and (later) tile
//! planning, blending and streaming, shared by the CPU and CUDA paths.

pub mod stitch;
pub mod tiling;

use crate::backend::cpu::CpuBackend;
use crate::error::Result;
use crate::model::Model;
use crate::net::{BnMode, Rln};
use crate::tensor::Tensor;

/// Something that runs the network forward (inference mode, running BN statistics) on
/// one normalized tile: N×C_in×D×H×W in, N×1×D×H×W prediction out. Any D, H, W.
pub trait TilePredictor {
    /// Short description for messages ("CPU f32, 2 threads", "NVIDIA H100 fp16").
    fn describe(&self) -> String;
    fn predict(&mut self, x: &Tensor<f32>) -> Result<Tensor<f32>>;
    /// Working memory per input voxel of a tile (bytes), for choosing tile sizes.
    fn bytes_per_voxel(&self) -> usize;
    /// Memory available for tiles (bytes), or None to let the caller decide (host RAM).
    fn memory_budget(&self) -> Option<usize> {
        None
    }
    /// Predicts a sequence of tiles, handing each result to `sink` in order. The default
    /// runs them one by one; a device backend overrides it to overlap transfers of tile
    /// k+1 with compute on tile k.
    fn predict_stream(
        &mut self,
        tiles: &mut dyn Iterator<Item = Result<Tensor<f32>>>,
        sink: &mut dyn FnMut(Tensor<f32>) -> Result<()>,
    ) -> Result<()> {
        for t in tiles {
            let y = self.predict(&t?)?;
            sink(y)?;
        }
        Ok(())
    }
}

/// The CPU reference as a tile predictor.
pub struct CpuPredictor {
    pub model: Model<f32>,
}

impl TilePredictor for CpuPredictor {
    fn describe(&self) -> String {
        format!(
            "CPU f32 ({}, {} threads)",
            crate::backend::cpu::simd::isa().name(),
            crate::threads()
        )
    }
    fn predict(&mut self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let b = CpuBackend::<f32>::new();
        Ok(Rln::new(&b, &self.model).forward(x, BnMode::Running, false).prediction)
    }
    fn bytes_per_voxel(&self) -> usize {
        // every activation of the forward pass is alive at the end (≈ 70 f32 channels at
        // full resolution, counting the half-resolution part), plus padding copies
        4 * 80
    }
}
