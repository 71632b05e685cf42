//! The model: the layer table of the spec, its config, its weights and their file.

pub mod config;
pub mod init;
pub mod layers;
pub mod tensor_file;

pub use config::{FixedNorm, ModelConfig, Variant, CONFIG_KEY, FORMAT_VERSION, FORMAT_VERSION_BASE};
pub use layers::{LayerOp, LayerSpec, L, LAYERS, NUM_LAYERS};

use crate::error::{Error, Result};
use crate::real::Real;
use std::path::Path;
use tensor_file::{TensorFile, TensorWriter};

/// Trainable tensors of one layer; empty vectors where the layer has none.
/// The same struct holds gradients and Adam moments.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerParams<T> {
    /// Conv weight in engine layout (see [`LayerSpec::weight_shape`]).
    pub weight: Vec<T>,
    /// Batch-norm scale γ.
    pub gamma: Vec<T>,
    /// Batch-norm shift β.
    pub beta: Vec<T>,
}

/// Which trainable tensor of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    Weight,
    Gamma,
    Beta,
}

impl ParamKind {
    pub const ALL: [ParamKind; 3] = [ParamKind::Weight, ParamKind::Gamma, ParamKind::Beta];
    /// Suffix of the canonical tensor name.
    pub const fn suffix(self) -> &'static str {
        match self {
            ParamKind::Weight => "weight",
            ParamKind::Gamma => "bn.weight",
            ParamKind::Beta => "bn.bias",
        }
    }
}

/// All trainable tensors of the network (49 with the spec's table), or a gradient or
/// optimizer moment of the same shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Params<T> {
    pub layers: Vec<LayerParams<T>>,
}

impl<T: Real> Params<T> {
    /// Zero tensors of the right sizes for `variant`.
    pub fn zeros(variant: Variant) -> Self {
        let ic = variant.input_channels();
        let layers = LAYERS
            .iter()
            .map(|l| {
                let bn = if l.has_bn() { l.bn_channels() } else { 0 };
                LayerParams {
                    weight: vec![T::zero(); l.weight_len(ic)],
                    gamma: vec![T::zero(); bn],
                    beta: vec![T::zero(); bn],
                }
            })
            .collect();
        Params { layers }
    }

    pub fn tensor(&self, l: usize, k: ParamKind) -> &Vec<T> {
        let p = &self.layers[l];
        match k {
            ParamKind::Weight => &p.weight,
            ParamKind::Gamma => &p.gamma,
            ParamKind::Beta => &p.beta,
        }
    }

    pub fn tensor_mut(&mut self, l: usize, k: ParamKind) -> &mut Vec<T> {
        let p = &mut self.layers[l];
        match k {
            ParamKind::Weight => &mut p.weight,
            ParamKind::Gamma => &mut p.gamma,
            ParamKind::Beta => &mut p.beta,
        }
    }

    /// (layer, kind) of every non-empty trainable tensor, in table order.
    pub fn ids(&self) -> Vec<(usize, ParamKind)> {
        let mut v = Vec::new();
        for l in 0..self.layers.len() {
            for k in ParamKind::ALL {
                if !self.tensor(l, k).is_empty() {
                    v.push((l, k));
                }
            }
        }
        v
    }

    /// Canonical name of a trainable tensor, e.g. `h1.fp.conv1.bn.weight`.
    pub fn name(l: usize, k: ParamKind) -> String {
        format!("{}.{}", LAYERS[l].name, k.suffix())
    }

    pub fn cast<U: Real>(&self) -> Params<U> {
        let c = |v: &Vec<T>| v.iter().map(|x| U::of(x.f64())).collect();
        Params {
            layers: self
                .layers
                .iter()
                .map(|p| LayerParams {
                    weight: c(&p.weight),
                    gamma: c(&p.gamma),
                    beta: c(&p.beta),
                })
                .collect(),
        }
    }

    /// Number of trainable scalars.
    pub fn count(&self) -> usize {
        self.layers
            .iter()
            .map(|p| p.weight.len() + p.gamma.len() + p.beta.len())
            .sum()
    }

    /// Calls `f` on every scalar of `self` together with the matching scalar of `other`.
    pub fn zip_mut(&mut self, other: &Params<T>, mut f: impl FnMut(&mut T, T)) {
        for (a, b) in self.layers.iter_mut().zip(&other.layers) {
            for (x, y) in a.weight.iter_mut().zip(&b.weight) {
                f(x, *y);
            }
            for (x, y) in a.gamma.iter_mut().zip(&b.gamma) {
                f(x, *y);
            }
            for (x, y) in a.beta.iter_mut().zip(&b.beta) {
                f(x, *y);
            }
        }
    }

    pub fn all_finite(&self) -> bool {
        self.layers
            .iter()
            .all(|p| p.weight.iter().chain(&p.gamma).chain(&p.beta).all(|v| v.is_finite()))
    }
}

/// Batch-norm running statistics per layer (empty for layers without batch norm).
#[derive(Clone, Debug, PartialEq)]
pub struct RunningStats<T> {
    pub mean: Vec<Vec<T>>,
    pub var: Vec<Vec<T>>,
}

impl<T: Real> RunningStats<T> {
    /// The initial statistics: mean 0, variance 1.
    pub fn initial() -> Self {
        let n = |v: f64| {
            LAYERS
                .iter()
                .map(|l| vec![T::of(v); if l.has_bn() { l.bn_channels() } else { 0 }])
                .collect()
        };
        RunningStats {
            mean: n(0.0),
            var: n(1.0),
        }
    }
    pub fn cast<U: Real>(&self) -> RunningStats<U> {
        let c = |v: &Vec<Vec<T>>| v.iter().map(|x| x.iter().map(|y| U::of(y.f64())).collect()).collect();
        RunningStats {
            mean: c(&self.mean),
            var: c(&self.var),
        }
    }
}

/// A complete model: config, trainable weights and batch-norm running statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct Model<T> {
    pub config: ModelConfig,
    pub params: Params<T>,
    pub running: RunningStats<T>,
}

const RUNNING_MEAN: &str = "bn.running_mean";
const RUNNING_VAR: &str = "bn.running_var";

impl<T: Real> Model<T> {
    pub fn cast<U: Real>(&self) -> Model<U> {
        Model {
            config: self.config.clone(),
            params: self.params.cast(),
            running: self.running.cast(),
        }
    }

    /// Every tensor of the model file: (canonical name, engine shape, values).
    pub fn named_tensors(&self) -> Vec<(String, Vec<usize>, Vec<f64>)> {
        let ic = self.config.variant.input_channels();
        let mut out = Vec::new();
        for (l, spec) in LAYERS.iter().enumerate() {
            let p = &self.params.layers[l];
            let f = |v: &Vec<T>| v.iter().map(|x| x.f64()).collect::<Vec<f64>>();
            if !p.weight.is_empty() {
                out.push((
                    Params::<T>::name(l, ParamKind::Weight),
                    spec.weight_shape(ic),
                    f(&p.weight),
                ));
            }
            if spec.has_bn() {
                let c = vec![spec.bn_channels()];
                out.push((Params::<T>::name(l, ParamKind::Gamma), c.clone(), f(&p.gamma)));
                out.push((Params::<T>::name(l, ParamKind::Beta), c.clone(), f(&p.beta)));
                out.push((
                    format!("{}.{RUNNING_MEAN}", spec.name),
                    c.clone(),
                    f(&self.running.mean[l]),
                ));
                out.push((format!("{}.{RUNNING_VAR}", spec.name), c, f(&self.running.var[l])));
            }
        }
        out
    }

    /// The model file as a [`TensorWriter`] (f32 tensors, config in the metadata), so that
    /// callers (checkpoints) can add tensors of their own before writing.
    pub fn to_writer(&self) -> TensorWriter {
        let mut w = TensorWriter::default();
        for (name, shape, data) in self.named_tensors() {
            let v: Vec<f32> = data.iter().map(|&x| x as f32).collect();
            w.add_f32(&name, shape, &v);
        }
        w.metadata.insert(CONFIG_KEY.into(), self.config.to_json());
        w
    }

    /// Writes the model file atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.to_writer().write(path)
    }

    /// Loads a model file written by [`Model::save`]; every tensor is checked for
    /// presence, shape and finiteness, and unknown tensors are rejected.
    /// A training checkpoint loads as the model it holds (its optimizer state is skipped).
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_tensor_file(&TensorFile::open(path)?)
    }

    /// A model from the bytes of a model file (e.g. one embedded in the binary).
    pub fn from_bytes(label: &str, bytes: &[u8]) -> Result<Self> {
        Self::from_tensor_file(&TensorFile::from_bytes(label, bytes.to_vec())?)
    }

    fn from_tensor_file(file: &TensorFile) -> Result<Self> {
        let optimizer: &[&str] = if file.metadata().contains_key("rln_checkpoint") {
            &["adam."]
        } else {
            &[]
        };
        Self::from_file(file, optimizer)
    }

    /// Reads the model out of an open file; names starting with one of `other_prefixes`
    /// belong to someone else (a checkpoint's optimizer state) and are not "extra".
    pub fn from_file(file: &TensorFile, other_prefixes: &[&str]) -> Result<Self> {
        let path = &file.path;
        let meta = file.metadata();
        let json = meta.get(CONFIG_KEY).ok_or_else(|| {
            Error::format(
                path,
                "no rln_config in the file's metadata: not an rln-engine model. \
                 Convert the authors' TensorFlow weights with `rln-engine import-tf`",
            )
        })?;
        let config = ModelConfig::from_json(json).map_err(|e| Error::format(path, e.to_string()))?;
        let mut model = Model {
            config: config.clone(),
            params: Params::zeros(config.variant),
            running: RunningStats::initial(),
        };
        let ic = config.variant.input_channels();
        let mut expected = std::collections::BTreeSet::new();
        for (l, spec) in LAYERS.iter().enumerate() {
            let mut read = |name: String, shape: Vec<usize>, limit: f64| -> Result<Vec<T>> {
                let t = file.get(&name)?;
                if t.shape != shape {
                    return Err(Error::format(
                        path,
                        format!("tensor '{name}' has shape {:?}; expected {shape:?}", t.shape),
                    ));
                }
                if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                    return Err(Error::format(
                        path,
                        format!("tensor '{name}' holds a non-finite value ({}) at index {i}", t.data[i]),
                    ));
                }
                check_magnitude(path, &name, &t.data, limit)?;
                expected.insert(name);
                Ok(t.data.iter().map(|&v| T::of(v)).collect())
            };
            if spec.op != LayerOp::BnOnly {
                model.params.layers[l].weight = read(
                    Params::<T>::name(l, ParamKind::Weight),
                    spec.weight_shape(ic),
                    MAX_ABS_PARAM,
                )?;
            }
            if spec.has_bn() {
                let c = vec![spec.bn_channels()];
                model.params.layers[l].gamma = read(Params::<T>::name(l, ParamKind::Gamma), c.clone(), MAX_ABS_PARAM)?;
                model.params.layers[l].beta = read(Params::<T>::name(l, ParamKind::Beta), c.clone(), MAX_ABS_PARAM)?;
                model.running.mean[l] = read(format!("{}.{RUNNING_MEAN}", spec.name), c.clone(), MAX_ABS_RUNNING)?;
                let var = read(format!("{}.{RUNNING_VAR}", spec.name), c, MAX_ABS_RUNNING)?;
                if let Some(v) = var.iter().find(|v| **v < T::zero()) {
                    return Err(Error::format(
                        path,
                        format!("tensor '{}.{RUNNING_VAR}' holds a negative variance {v}", spec.name),
                    ));
                }
                model.running.var[l] = var;
            }
        }
        let extra: Vec<String> = file
            .names()
            .into_iter()
            .filter(|n| !expected.contains(n) && !other_prefixes.iter().any(|p| n.starts_with(p)))
            .collect();
        if !extra.is_empty() {
            let shown: Vec<&String> = extra.iter().take(5).collect();
            let more = if extra.len() > 5 {
                format!(" and {} more", extra.len() - 5)
            } else {
                String::new()
            };
            return Err(Error::format(
                path,
                format!(
                    "unexpected tensors {shown:?}{more}: this file does not match the RLN layer table (variant {:?})",
                    config.variant
                ),
            ));
        }
        Ok(model)
    }

    /// Converts the authors' TF-named checkpoint tensors (reference/rln-authors-weights)
    /// into a model with the given `div_eps`.
    pub fn import_tf(path: &Path, div_eps: f64) -> Result<Self> {
        let file = TensorFile::open(path)?;
        let config = ModelConfig {
            div_eps,
            provenance: format!(
                "imported from the authors' TensorFlow checkpoint tensors in {}",
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
            ..ModelConfig::default()
        };
        config.validate()?;
        let mut model = Model {
            config,
            params: Params::zeros(Variant::Single),
            running: RunningStats::initial(),
        };
        let finite = |name: &str, v: &[f64]| -> Result<()> {
            match v.iter().position(|x| !x.is_finite()) {
                Some(i) => Err(Error::format(
                    path,
                    format!("tensor '{name}' holds a non-finite value at index {i}"),
                )),
                None => Ok(()),
            }
        };
        for (l, spec) in LAYERS.iter().enumerate() {
            if let Some(tfw) = spec.tf_weight {
                let t = file.get(tfw)?;
                let (ci, co) = (spec.c_in, spec.c_out);
                let want = match spec.op {
                    LayerOp::Conv3 => vec![3, 3, 3, ci, co],
                    _ => vec![2, 2, 2, co, ci],
                };
                if t.shape != want {
                    return Err(Error::format(
                        path,
                        format!("tensor '{tfw}' has shape {:?}; expected {want:?} (TF layout)", t.shape),
                    ));
                }
                finite(tfw, &t.data)?;
                check_magnitude(path, tfw, &t.data, MAX_ABS_PARAM)?;
                model.params.layers[l].weight = tf_to_engine(spec, &t.data).into_iter().map(T::of).collect();
            }
            if let Some(bn) = spec.tf_bn {
                let c = spec.bn_channels();
                let get = |suffix: &str| -> Result<Vec<T>> {
                    let name = format!("{bn}/{suffix}");
                    let t = file.get_len(&name, c)?;
                    finite(&name, &t.data)?;
                    let running = suffix.starts_with("moving_");
                    check_magnitude(
                        path,
                        &name,
                        &t.data,
                        if running { MAX_ABS_RUNNING } else { MAX_ABS_PARAM },
                    )?;
                    if suffix == "moving_variance" {
                        if let Some(v) = t.data.iter().find(|v| **v < 0.0) {
                            return Err(Error::format(
                                path,
                                format!("tensor '{name}' holds a negative variance {v}"),
                            ));
                        }
                    }
                    Ok(t.data.into_iter().map(T::of).collect())
                };
                model.params.layers[l].gamma = get("gamma")?;
                model.params.layers[l].beta = get("beta")?;
                model.running.mean[l] = get("moving_mean")?;
                model.running.var[l] = get("moving_variance")?;
            }
        }
        Ok(model)
    }
}

/// Largest magnitude accepted for a trainable tensor (conv weights, batch-norm γ and β)
/// when a model is loaded or imported. Trained RLN models stay below ~20; a weight beyond
/// 1e6 overflows float32 activations (e.g. an all-NaN prediction) and means a corrupt or
/// diverged file.
pub const MAX_ABS_PARAM: f64 = 1e6;

/// Largest magnitude accepted for batch-norm running statistics. They follow the
/// activations' scale: the shipped and the authors' models reach running variances of
/// ~3e8 (h3.conv3), so the bound is far looser than for weights.
pub const MAX_ABS_RUNNING: f64 = 1e15;

fn check_magnitude(path: &Path, name: &str, data: &[f64], limit: f64) -> Result<()> {
    match data.iter().position(|v| v.abs() > limit) {
        Some(i) => Err(Error::format(
            path,
            format!(
                "tensor '{name}' holds {:e} at index {i}, beyond the plausible ±{limit:e}: \
                 the file is corrupt or its training diverged; use another model",
                data[i]
            ),
        )),
        None => Ok(()),
    }
}

/// The authors' TF name of a trainable tensor (for the gradient vectors).
pub fn tf_param_name(l: usize, k: ParamKind) -> Option<String> {
    let spec = &LAYERS[l];
    match k {
        ParamKind::Weight => spec.tf_weight.map(|s| s.to_string()),
        ParamKind::Gamma => spec.tf_bn.map(|b| format!("{b}/gamma")),
        ParamKind::Beta => spec.tf_bn.map(|b| format!("{b}/beta")),
    }
}

/// TF layout → engine layout. Conv: [kd,kh,kw,in,out] → [out,in,kd,kh,kw].
/// Transposed conv: [kd,kh,kw,out,in] → [in,out,kd,kh,kw].
pub fn tf_to_engine(spec: &LayerSpec, tf: &[f64]) -> Vec<f64> {
    let (ci, co) = (spec.c_in, spec.c_out);
    let mut out = vec![0.0; tf.len()];
    match spec.op {
        LayerOp::Conv3 => {
            for k in 0..27 {
                for i in 0..ci {
                    for o in 0..co {
                        out[(o * ci + i) * 27 + k] = tf[(k * ci + i) * co + o];
                    }
                }
            }
        }
        LayerOp::Up2 => {
            for k in 0..8 {
                for o in 0..co {
                    for i in 0..ci {
                        out[(i * co + o) * 8 + k] = tf[(k * co + o) * ci + i];
                    }
                }
            }
        }
        LayerOp::BnOnly => {}
    }
    out
}

/// Engine layout → TF layout (inverse of [`tf_to_engine`]).
pub fn engine_to_tf(spec: &LayerSpec, w: &[f64]) -> Vec<f64> {
    let (ci, co) = (spec.c_in, spec.c_out);
    let mut out = vec![0.0; w.len()];
    match spec.op {
        LayerOp::Conv3 => {
            for k in 0..27 {
                for i in 0..ci {
                    for o in 0..co {
                        out[(k * ci + i) * co + o] = w[(o * ci + i) * 27 + k];
                    }
                }
            }
        }
        LayerOp::Up2 => {
            for k in 0..8 {
                for o in 0..co {
                    for i in 0..ci {
                        out[(k * co + o) * ci + i] = w[(i * co + o) * 8 + k];
                    }
                }
            }
        }
        LayerOp::BnOnly => {}
    }
    out
}
