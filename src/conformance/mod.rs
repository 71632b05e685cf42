//! Conformance with the authors' TensorFlow graph: run a vectors file (reference/README.md)
//! through a model in inference and training mode, with the loss terms and the paper-mode
//! gradients, and compare every key by relative L2 error with its tolerance.

use crate::backend::cpu::{CpuBackend, CpuReal};
use crate::backend::loss::{loss_terms, LossTerms};
use crate::backend::{Backend, GradMode};
use crate::error::{Error, Result};
use crate::model::tensor_file::TensorFile;
use crate::model::{engine_to_tf, tf_param_name, LayerOp, Model, LAYERS};
use crate::net::{BnMode, Rln};
use crate::real::Real;
use crate::tensor::{rel_l2, Shape, Tensor};
use serde::Serialize;
use std::path::Path;

pub mod cuda;

/// Tolerances of reference/README.md for a float32 engine.
pub const TOL_INFER: f64 = 1e-5;
pub const TOL_TRAIN: f64 = 1e-4;
pub const TOL_GRAD: f64 = 5e-3;

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub key: String,
    pub rel_err: f64,
    pub tol: f64,
    pub pass: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub vectors: String,
    /// N, D, H, W of the vectors' input.
    pub input_shape: [usize; 4],
    pub precision: String,
    pub rows: Vec<Row>,
    pub passed: bool,
}

impl Report {
    pub fn worst(&self, prefix: &str) -> f64 {
        self.rows
            .iter()
            .filter(|r| r.key.starts_with(prefix))
            .map(|r| r.rel_err)
            .fold(0.0, f64::max)
    }
}

/// Reads an NDHWC one-channel volume batch, checking its layout.
fn read_volume<T: Real>(file: &TensorFile, key: &str) -> Result<Tensor<T>> {
    let t = file.get(key)?;
    match t.shape.as_slice() {
        [n, d, h, w, 1] => {
            let shape = Shape::new(*n, 1, *d, *h, *w);
            let data: Vec<T> = t.data.iter().map(|&v| T::of(v)).collect();
            Tensor::from_ndhwc(shape, &data)
        }
        s => Err(Error::format(
            &file.path,
            format!("'{key}' has shape {s:?}; expected [N, D, H, W, 1] (NDHWC, one channel)"),
        )),
    }
}

fn row(key: String, got: &[f64], want: &[f64], tol: f64) -> Row {
    let e = rel_l2(got, want);
    Row {
        key,
        rel_err: e,
        tol,
        pass: e <= tol,
    }
}

/// Runs the conformance check of `model` on `vectors` with the CPU backend in precision T.
pub fn run<T: CpuReal>(model: &Model<f32>, vectors: &Path) -> Result<Report> {
    run_on(&CpuBackend::<T>::new(), model, vectors)
}

/// The conformance check with the network on backend `b` (inference and training mode,
/// loss and paper-mode gradients all computed there).
pub fn run_on<B: Backend>(b: &B, model: &Model<f32>, vectors: &Path) -> Result<Report> {
    type T<B> = <B as Backend>::T;
    let file = TensorFile::open(vectors)?;
    let model: Model<T<B>> = model.cast();
    if model.config.variant.input_channels() != 1 {
        return Err(Error::invalid(
            "conformance vectors are for the single-view network; this model is a dual-view variant",
        ));
    }
    let x: Tensor<T<B>> = read_volume(&file, "input")?;
    let g: Tensor<T<B>> = read_volume(&file, "ground_truth")?;
    if x.shape != g.shape {
        return Err(Error::format(
            vectors,
            format!("input {} and ground_truth {} differ in shape", x.shape, g.shape),
        ));
    }
    let net = Rln::new(b, &model);
    let mut rows = Vec::new();
    let f64v = |t: &Tensor<T<B>>| t.data.iter().map(|v| v.f64()).collect::<Vec<f64>>();
    let mut compare_outputs = |mode: &str,
                               y: &Tensor<T<B>>,
                               e1r: &Tensor<T<B>>,
                               e2r: &Tensor<T<B>>,
                               terms: LossTerms,
                               tol: f64|
     -> Result<()> {
        for (k, t) in [("prediction", y), ("e1_raw", e1r), ("e2_raw", e2r)] {
            let key = format!("{mode}.{k}");
            let want = read_volume::<f64>(&file, &key)?;
            if want.shape != t.shape {
                return Err(Error::format(
                    vectors,
                    format!(
                        "'{key}' has shape {}, but the input gives {}: the vectors file is inconsistent (regenerate it)",
                        want.shape, t.shape
                    ),
                ));
            }
            rows.push(row(key, &f64v(t), &want.data, tol));
        }
        for (k, v) in [
            ("mse", terms.mse),
            ("mse_aux", terms.mse_aux),
            ("ssim", terms.ssim),
            ("loss", terms.loss),
        ] {
            let key = format!("{mode}.{k}");
            let want = file.get_len(&key, 1)?;
            rows.push(row(key, &[v], &want.data, tol));
        }
        Ok(())
    };

    let (xb, gb) = (b.from_host(&x)?, b.from_host(&g)?);
    // inference mode: running statistics
    let fwd = net.forward(&xb, BnMode::Running, false)?;
    let (y, e1r, e2r) = (
        b.to_host(&fwd.prediction)?,
        b.to_host(&fwd.e1_raw)?,
        b.to_host(&fwd.e2_raw)?,
    );
    let terms = loss_terms(&y.data, &e1r.data, &x.data, &g.data);
    compare_outputs("infer", &y, &e1r, &e2r, terms, TOL_INFER)?;

    // training mode: batch statistics, loss gradient, paper-mode backward
    let fwd = net.forward(&xb, BnMode::Batch, true)?;
    let (terms, dy, de1r) = b.loss(&fwd.prediction, &fwd.e1_raw, &xb, &gb)?;
    let (y, e1r, e2r) = (
        b.to_host(&fwd.prediction)?,
        b.to_host(&fwd.e1_raw)?,
        b.to_host(&fwd.e2_raw)?,
    );
    compare_outputs("train", &y, &e1r, &e2r, terms, TOL_TRAIN)?;
    let grads = net.backward(&fwd, &dy, &de1r, GradMode::Paper)?;
    for (l, k) in grads.ids() {
        let name = tf_param_name(l, k).expect("every trainable tensor has a TF name");
        let key = format!("grad.{name}");
        let want = file.get(&key)?;
        let got = grads.tensor(l, k);
        let got = if matches!(LAYERS[l].op, LayerOp::Conv3 | LayerOp::Up2) && k == crate::model::ParamKind::Weight {
            engine_to_tf(&LAYERS[l], got)
        } else {
            got.clone()
        };
        if want.data.len() != got.len() {
            return Err(Error::format(
                vectors,
                format!(
                    "'{key}' has {} values; the model's tensor has {}",
                    want.data.len(),
                    got.len()
                ),
            ));
        }
        rows.push(row(key, &got, &want.data, TOL_GRAD));
    }
    let s = x.shape;
    Ok(Report {
        vectors: vectors.display().to_string(),
        input_shape: [s.n, s.d, s.h, s.w],
        precision: <T<B> as Real>::NAME.to_string(),
        passed: rows.iter().all(|r| r.pass),
        rows,
    })
}
