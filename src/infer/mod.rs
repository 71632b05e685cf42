//! Inference on volumes of any size: the engines that predict one tile
//! ([`TilePredictor`], [`CpuPredictor`]; the CUDA one is `backend::cuda::CudaPredictor`,
//! a tile predictor through [`cuda`]),
//! tile planning and blending ([`tiling`], [`stitch`]), several predictors as one for the
//! blended tiling ([`pool`]), streaming from files to files ([`stream`]) and caller-owned
//! buffers ([`buffers`]), shared by the CPU and CUDA paths.

pub mod buffers;
pub mod cuda;
pub mod pool;
pub mod stitch;
pub mod stream;
pub mod tiling;

use crate::backend::cpu::CpuBackend;
use crate::error::Result;
use crate::imaging::volume::Volume;
use crate::model::Model;
use crate::net::Rln;
use crate::tensor::Tensor;
use stitch::{run_tiled, Affine, NormalizeMode, StitchOptions};
use tiling::{MemorySink, MemorySource, PlaneSource, TilePlan, DEFAULT_OVERLAP, RECEPTIVE_RADIUS};

/// Something that runs the network forward (inference mode, running BN statistics) on
/// one normalized tile: N×C_in×D×H×W in, N×1×D×H×W prediction out. Any D, H, W.
///
/// `Send`: several predictors (one per GPU) run on their own threads in the streaming
/// pipeline.
pub trait TilePredictor: Send {
    /// Short description for messages ("CPU f32, 2 threads", "NVIDIA H100 fp16").
    fn describe(&self) -> String;
    fn predict(&mut self, x: &Tensor<f32>) -> Result<Tensor<f32>>;
    /// Working memory per input voxel of a tile (bytes), for choosing tile sizes.
    fn bytes_per_voxel(&self) -> usize;
    /// Memory available for tiles (bytes), or None to let the caller decide (host RAM).
    fn memory_budget(&self) -> Option<usize> {
        None
    }
    /// Predicts a sequence of tiles, handing each (input, prediction) pair to `sink` in
    /// order; the input comes back so its buffer can be reused for a later tile, and the
    /// prediction is lent, so a device backend can reuse its host buffer too. The
    /// default runs them one by one; a device backend overrides it to overlap transfers
    /// of tile k+1 with compute on tile k.
    fn predict_stream(
        &mut self,
        tiles: &mut dyn Iterator<Item = Result<Tensor<f32>>>,
        sink: &mut dyn FnMut(Tensor<f32>, &Tensor<f32>) -> Result<()>,
    ) -> Result<()> {
        for t in tiles {
            let x = t?;
            let y = self.predict(&x)?;
            sink(x, &y)?;
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
            crate::backend::cpu::isa().name(),
            crate::threads()
        )
    }
    fn predict(&mut self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let b = CpuBackend::<f32>::new();
        Ok(Rln::new(&b, &self.model).infer(x, false)?.prediction)
    }
    fn bytes_per_voxel(&self) -> usize {
        // every activation of the forward pass is alive at the end (≈ 70 f32 channels at
        // full resolution, counting the half-resolution part), plus padding copies
        4 * 80
    }
}

/// Deconvolves a raw volume in memory (the library's one-call entry; `infer` streams
/// files instead): global percentile normalization, tiles of at most `max_core` voxels
/// per axis (plus context; the whole volume when it fits), output mapped back to the
/// input's intensity range.
pub fn deconvolve(
    pred: &mut dyn TilePredictor,
    model: &Model<f32>,
    input: &Volume,
    max_core: [usize; 3],
) -> Result<Volume> {
    let plan = TilePlan::new(input.dims, max_core, DEFAULT_OVERLAP, RECEPTIVE_RADIUS)?;
    let pct = model.config.norm_percentiles;
    let mut src = MemorySource {
        dims: input.dims,
        data: &input.data,
    };
    let aff = stitch::model_normalization(&mut src, &model.config, usize::MAX)?;
    let opts = StitchOptions {
        plan,
        normalize: NormalizeMode::Global,
        percentiles: pct,
        rescale_output: true,
        variant: model.config.variant,
    };
    let mut sink = MemorySink {
        data: Vec::with_capacity(input.len()),
    };
    let mut views: Vec<&mut dyn PlaneSource> = vec![&mut src];
    let global: [Affine; 1] = [aff];
    run_tiled(pred, &mut views, &global, &mut sink, &opts, &mut |_, _| {})?;
    input.like(sink.data)
}
