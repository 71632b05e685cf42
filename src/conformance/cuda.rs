//! The conformance vectors' inference-mode keys (infer.prediction, infer.e1_raw,
//! infer.e2_raw; reference/README.md) computed on the GPU: the network of `net`
//! ([`Rln::infer`]) on [`CudaInferBackend`].

use super::{Row, TOL_INFER};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaDevice, CudaInferBackend, CudaOptions, DevTensor, Precision};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::tensor_file::TensorFile;
use crate::model::Model;
use crate::net::Rln;
use crate::tensor::{rel_l2, Shape, Tensor};
use std::path::Path;

/// Tolerance of the f16-storage network against the vectors (relative L2).
pub const TOL_INFER_F16: f64 = 1e-2;
/// bf16 storage: 8 significant bits against fp16's 11 (a unit roundoff 8× larger), so
/// 8× [`TOL_INFER_F16`]'s margin would be 8e-2; 3e-2 keeps the test meaningful (the
/// emulation measures 5.4e-4 on a random model).
pub const TOL_INFER_BF16: f64 = 3e-2;

fn read_volume(file: &TensorFile, key: &str) -> Result<Tensor<f32>> {
    let t = file.get(key)?;
    match t.shape.as_slice() {
        [n, d, h, w, 1] => {
            let data: Vec<f32> = t.data.iter().map(|&v| v as f32).collect();
            Tensor::from_ndhwc(Shape::new(*n, 1, *d, *h, *w), &data)
        }
        s => Err(Error::format(
            &file.path,
            format!("'{key}' has shape {s:?}; expected [N, D, H, W, 1]"),
        )),
    }
}

/// Runs the vectors' input through `model` on the GPU and compares the three
/// inference-mode outputs (tolerance 1e-5 for f32, [`TOL_INFER_F16`] for f16,
/// [`TOL_INFER_BF16`] for bf16).
pub fn run_infer(model: &Model<f32>, vectors: &Path, opts: CudaOptions) -> Result<Vec<Row>> {
    let file = TensorFile::open(vectors)?;
    let x = read_volume(&file, "input")?;
    let b = CudaInferBackend::new(CudaDevice::open(opts.device)?, model, opts)?;
    // padded and cropped on the host, as the streaming predictor does
    let cpu = CpuBackend::<f32>::new();
    let out = Rln::new(&b, b.model()).infer(&b.from_host(&cpu.pad_even(&x)?)?, true)?;
    let host = |t: Option<&DevTensor>| -> Result<Option<Tensor<f32>>> {
        t.map(|t| cpu.crop(&b.to_host(t)?, x.shape)).transpose()
    };
    let (prediction, e1_raw, e2_raw) = (
        host(Some(&out.prediction))?,
        host(out.e1_raw.as_ref())?,
        host(out.e2_raw.as_ref())?,
    );
    let tol = match opts.precision {
        Precision::F32 => TOL_INFER,
        Precision::F16 => TOL_INFER_F16,
        Precision::Bf16 => TOL_INFER_BF16,
    };
    let mut rows = Vec::new();
    for (k, t) in [
        ("prediction", prediction.as_ref()),
        ("e1_raw", e1_raw.as_ref()),
        ("e2_raw", e2_raw.as_ref()),
    ] {
        let key = format!("infer.{k}");
        let want = read_volume(&file, &key)?;
        let got = t.expect("raw outputs requested");
        let e = rel_l2(&got.data, &want.data);
        rows.push(Row {
            key,
            rel_err: e,
            tol,
            pass: e <= tol,
        });
    }
    Ok(rows)
}
