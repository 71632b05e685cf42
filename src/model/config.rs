//! The model's JSON config, stored in the safetensors header under `rln_config`.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The newest model-file format version this engine reads and writes. A file is
/// written with the lowest version that holds it: 1, or 2 when it carries a fixed
/// normalization (`norm_fixed`), which an engine that reads only version 1 would
/// silently ignore (it would normalize by percentiles and give a wrong result); such
/// an engine refuses a version-2 file instead.
pub const FORMAT_VERSION: u32 = FORMAT_VERSION_FIXED_NORM;
/// The version of files without a fixed normalization (what every engine reads).
pub const FORMAT_VERSION_BASE: u32 = 1;
/// The version that introduced `norm_fixed`.
const FORMAT_VERSION_FIXED_NORM: u32 = 2;
/// Metadata key holding the JSON config in the safetensors header.
pub const CONFIG_KEY: &str = "rln_config";

/// Which network the weights belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// One view, one input channel: the network of rln-spec.md §3.
    #[default]
    Single,
    /// RLN-dual, two registered views averaged into one input channel.
    DualAverage,
    /// RLN-dual, two registered views as two input channels of the first convs
    /// (h1.fp.conv1 and h2.fp.conv1); everywhere else the network uses their mean.
    DualConcat,
}

impl Variant {
    /// Channels of the network input tensor.
    pub const fn input_channels(self) -> usize {
        match self {
            Variant::DualConcat => 2,
            _ => 1,
        }
    }
    /// Number of input volumes the user supplies.
    pub const fn views(self) -> usize {
        match self {
            Variant::Single => 1,
            _ => 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub format_version: u32,
    pub variant: Variant,
    /// ε of the RL division nodes `a / (cm(fp) + ε)` (1e-4 in the authors' checkpoint).
    pub div_eps: f64,
    /// Batch-norm ε (1e-3 in the authors' graph).
    pub bn_eps: f64,
    /// Running statistics decay: r ← momentum·r + (1 − momentum)·batch.
    pub bn_momentum: f64,
    /// Percentiles (low, high) of the input normalization (spec §6).
    pub norm_percentiles: [f64; 2],
    /// Fixed input normalization (`train --fixed-norm`), used instead of each volume's
    /// percentiles when present. See [`FixedNorm`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_fixed: Option<FixedNorm>,
    /// Where the weights came from (free text: import source, training command...).
    #[serde(default)]
    pub provenance: String,
    /// The PSF the training data was made with, if known (parameters of `rln-engine psf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psf: Option<serde_json::Value>,
    /// Training summary (steps, recipe, validation metrics), if trained by the engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<serde_json::Value>,
}

/// One input normalization for every volume: raw value `low` maps to 0 and `high` to 1
/// (`v' = (v − low)/(high − low)`), whatever else the volume holds. Percentile
/// normalization stretches each volume to its own range, so a scene of thin structures
/// only (whose blurred peaks are dim) is shown to the network as brightly as one of
/// large objects, and the network, which learned that the brightest structures are the
/// large ones, under-sharpens it and amplifies its background noise. With fixed values a
/// structure's brightness keeps its meaning, which is sound when every volume comes
/// from one acquisition setting (what `train --like` matches).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FixedNorm {
    /// Raw value mapped to 0, in the units of the data the model is applied to.
    pub low: f64,
    /// Raw value mapped to 1.
    pub high: f64,
    /// The camera of that data, `raw = camera_offset + camera_gain · photons` (from
    /// `train --like`; 0 and 1 when the values are in the training inputs' own units):
    /// synthetic inputs, which are in photons, go through it in training and `compare`.
    pub camera_offset: f64,
    pub camera_gain: f64,
}

impl FixedNorm {
    pub fn validate(&self) -> Result<()> {
        let (l, h, o, g) = (self.low, self.high, self.camera_offset, self.camera_gain);
        if !(l.is_finite() && h.is_finite() && l < h) {
            return Err(Error::Model(format!(
                "fixed normalization values {l}, {h} must be finite with low < high"
            )));
        }
        if !(o.is_finite() && g.is_finite() && g > 0.0) {
            return Err(Error::Model(format!(
                "fixed normalization camera offset {o} and gain {g} must be finite with a positive gain"
            )));
        }
        Ok(())
    }
    /// The map `v' = v·scale + offset` of raw values: `(scale, offset)`.
    pub fn affine(&self) -> (f64, f64) {
        Self::two_point_map(self.low, self.high)
    }
    /// `low` → 0, `high` → 1 as `(scale, offset)`: the one formula of fixed
    /// normalization (training crops, inference).
    pub fn two_point_map(low: f64, high: f64) -> (f64, f64) {
        let s = 1.0 / (high - low);
        (s, -low * s)
    }
    /// The same normalization for values in photons (synthetic volumes): low and high
    /// taken back through the camera.
    pub fn in_photons(&self) -> FixedNorm {
        FixedNorm {
            low: (self.low - self.camera_offset) / self.camera_gain,
            high: (self.high - self.camera_offset) / self.camera_gain,
            camera_offset: 0.0,
            camera_gain: 1.0,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            format_version: FORMAT_VERSION_BASE,
            variant: Variant::Single,
            div_eps: 1e-3,
            bn_eps: 1e-3,
            bn_momentum: 0.99,
            norm_percentiles: [0.01, 99.5],
            norm_fixed: None,
            provenance: String::new(),
            psf: None,
            training: None,
        }
    }
}

impl ModelConfig {
    /// The format version this config is written with: the lowest that holds it.
    pub fn required_version(&self) -> u32 {
        if self.norm_fixed.is_some() {
            FORMAT_VERSION_FIXED_NORM
        } else {
            FORMAT_VERSION_BASE
        }
    }

    pub fn to_json(&self) -> String {
        let mut c = self.clone();
        c.format_version = c.required_version();
        serde_json::to_string(&c).expect("config serializes")
    }

    pub fn from_json(s: &str) -> Result<Self> {
        // read the version first, so an unknown version gets its own message
        let v: serde_json::Value =
            serde_json::from_str(s).map_err(|e| Error::Model(format!("config is not valid JSON: {e}")))?;
        match v.get("format_version").and_then(|x| x.as_u64()) {
            // version 1 with norm_fixed: written before version 2 existed; read as is
            Some(ver) if (FORMAT_VERSION_BASE as u64..=FORMAT_VERSION as u64).contains(&ver) => {}
            Some(ver) => {
                return Err(Error::Model(format!(
                    "model format version {ver} is not known to this engine (it reads versions \
                     {FORMAT_VERSION_BASE} to {FORMAT_VERSION}); \
                     use the rln-engine release that wrote it, or re-export the model"
                )))
            }
            None => return Err(Error::Model("config has no format_version".into())),
        }
        let c: ModelConfig = serde_json::from_value(v).map_err(|e| Error::Model(format!("config is invalid: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        let ok = |v: f64| v.is_finite() && v > 0.0;
        if !ok(self.div_eps) || !ok(self.bn_eps) {
            return Err(Error::Model(format!(
                "div_eps ({}) and bn_eps ({}) must be positive and finite",
                self.div_eps, self.bn_eps
            )));
        }
        if !(self.bn_momentum >= 0.0 && self.bn_momentum < 1.0) {
            return Err(Error::Model(format!(
                "bn_momentum {} must be in [0, 1)",
                self.bn_momentum
            )));
        }
        if let Some(f) = &self.norm_fixed {
            f.validate()?;
        }
        let [lo, hi] = self.norm_percentiles;
        if !((0.0..100.0).contains(&lo) && lo < hi && hi <= 100.0) {
            return Err(Error::Model(format!(
                "norm_percentiles {lo}, {hi} must satisfy 0 ≤ low < high ≤ 100"
            )));
        }
        Ok(())
    }
}
