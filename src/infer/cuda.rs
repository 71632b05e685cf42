//! The CUDA tile predictor: [`CudaPredictor`] (the device side of a stream of tiles:
//! double-buffered transfers, f16 staging, its buffers) running the network of `net`
//! ([`Rln::infer`]) on its [`CudaInferBackend`], whose fused kernels run the stages; and
//! [`predict_host`], one host tensor through the device the same way (tests, benchmark,
//! conformance).

use super::TilePredictor;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaInferBackend, CudaPredictor, DevTensor};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::net::Rln;
use crate::tensor::Tensor;

/// The forward pass a stream runs on each device tile: the prediction of `net`.
fn forward(b: &CudaInferBackend, x: &DevTensor) -> Result<DevTensor> {
    Ok(Rln::new(b, b.model()).infer(x, false)?.prediction)
}

impl TilePredictor for CudaPredictor {
    fn describe(&self) -> String {
        CudaPredictor::describe(self)
    }

    /// One tile through the streaming path (so that f16 travel applies here too and a
    /// tile predicted alone equals the same tile streamed).
    fn predict(&mut self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let mut y = None;
        let mut one = std::iter::once(Ok(x.clone()));
        self.predict_stream(&mut one, &mut |_x, p| {
            y = Some(p.clone());
            Ok(())
        })?;
        y.ok_or_else(|| Error::Cuda("the forward pass returned no tile".into()))
    }

    fn bytes_per_voxel(&self) -> usize {
        CudaPredictor::bytes_per_voxel(self)
    }

    fn memory_budget(&self) -> Option<usize> {
        CudaPredictor::memory_budget(self)
    }

    fn predict_stream(
        &mut self,
        tiles: &mut dyn Iterator<Item = Result<Tensor<f32>>>,
        sink: &mut dyn FnMut(Tensor<f32>, &Tensor<f32>) -> Result<()>,
    ) -> Result<()> {
        self.predict_stream_with(tiles, sink, &mut forward)
    }
}

/// What [`predict_host`] returns, cropped to the input's size.
pub struct HostOutputs {
    pub prediction: Tensor<f32>,
    pub e1_raw: Option<Tensor<f32>>,
    pub e2_raw: Option<Tensor<f32>>,
}

/// The network on a host tensor (N×C_in×D×H×W, any sizes) through the device, as a tile
/// of a stream runs: mirror-padded to even sizes on the host, [`Rln::infer`] on `b`, the
/// outputs copied back and cropped; with `keep_raw` also E1r and E2r. Synchronous.
pub fn predict_host(b: &CudaInferBackend, x: &Tensor<f32>, keep_raw: bool) -> Result<HostOutputs> {
    let cpu = CpuBackend::<f32>::new();
    let xd = b
        .from_host(&cpu.pad_even(x)?)
        .map_err(|e| e.context("copying the input to the device"))?;
    let out = Rln::new(b, b.model()).infer(&xd, keep_raw)?;
    let host = |t: &DevTensor, what: &str| -> Result<Tensor<f32>> {
        let t = b
            .to_host(t)
            .map_err(|e| e.context(format!("running the forward pass and copying {what} back")))?;
        cpu.crop(&t, x.shape.with_c(1))
    };
    Ok(HostOutputs {
        prediction: host(&out.prediction, "the prediction")?,
        e1_raw: out.e1_raw.as_ref().map(|t| host(t, "E1r")).transpose()?,
        e2_raw: out.e2_raw.as_ref().map(|t| host(t, "E2r")).transpose()?,
    })
}
