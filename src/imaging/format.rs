//! What every volume reader and writer shares, below them and their dispatcher
//! ([`super::io`], [`super::stream`]): the output sample types and the range check all
//! writers run, the read options, `file.h5:/dataset` paths, and the u16 conversion.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Sample type of a written volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputDtype {
    /// 32-bit float, exact.
    F32,
    /// 16-bit unsigned: values rounded to the nearest integer; a value outside
    /// [0, 65535] after rounding is an error, never clamped (scale first, or write f32).
    U16,
    /// 16-bit IEEE float (≈3 significant digits); a magnitude above 65504 is an error,
    /// never turned into infinity.
    F16,
}

/// Checks that every voxel of `data` (z-major, `shape`, placed at `start` in its volume)
/// is finite and can be written as `dtype` without clamping or overflowing to infinity.
/// All writers call it, so a result never silently changes on its way to disk.
pub fn check_output_range(
    data: &[f32],
    dtype: OutputDtype,
    start: [usize; 3],
    shape: [usize; 3],
    what: &str,
) -> Result<()> {
    let bad = |v: f32| match dtype {
        OutputDtype::F32 => !v.is_finite(),
        // rounds to 0 ..= 65535
        OutputDtype::U16 => !(-0.5..65535.5).contains(&v),
        OutputDtype::F16 => !(v.is_finite() && v.abs() <= 65504.0),
    };
    let Some(i) = data.iter().position(|&v| bad(v)) else {
        return Ok(());
    };
    let v = data[i];
    let (x, y, z) = (i % shape[2], (i / shape[2]) % shape[1], i / (shape[2] * shape[1]));
    let at = format!(
        "voxel (z, y, x) = ({}, {}, {})",
        start[0] + z,
        start[1] + y,
        start[2] + x
    );
    Err(Error::invalid(if !v.is_finite() {
        format!("{what}: {at} is {v}; non-finite results are not written")
    } else {
        let range = match dtype {
            OutputDtype::U16 => "u16 (0…65535 after rounding)",
            _ => "f16 (magnitude at most 65504)",
        };
        format!(
            "{what}: {at} is {v}, which does not fit {range}; write f32 instead \
             (--output-dtype f32, or --dtype f32 for convert) or scale the values first"
        )
    }))
}

impl OutputDtype {
    pub fn bytes(self) -> usize {
        match self {
            OutputDtype::F32 => 4,
            OutputDtype::U16 | OutputDtype::F16 => 2,
        }
    }
}

impl std::str::FromStr for OutputDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(OutputDtype::F32),
            "u16" | "uint16" => Ok(OutputDtype::U16),
            "f16" | "float16" => Ok(OutputDtype::F16),
            _ => Err(Error::invalid(format!(
                "unknown output type {s:?}: use f32, u16 or f16"
            ))),
        }
    }
}

/// How to read a volume.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// Channel to keep from RGB / multi-sample pixels or ImageJ multi-channel stacks.
    pub channel: Option<usize>,
    /// Time point to keep from ImageJ / OME stacks with several (counted from 0).
    pub time: Option<usize>,
    /// HDF5 dataset (overrides a `file.h5:/dataset` suffix).
    pub dataset: Option<String>,
    /// Accept single-plane images (as a 1×H×W volume). Off: a clear error.
    pub allow_2d: bool,
    /// Reject NaN / infinite voxels, naming the first one's position.
    pub check_finite: bool,
    /// Streaming TIFF and slice-folder readers: the most planes (or their strip bands)
    /// the read cache holds; `None`: [`crate::imaging::stream::tiff::DEFAULT_CACHE_PLANES`].
    /// The streaming pipeline sets it to its tile window's depth.
    pub cache_planes: Option<usize>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            channel: None,
            time: None,
            dataset: None,
            allow_2d: false,
            check_finite: true,
            cache_planes: None,
        }
    }
}

/// Splits `file.h5:/dataset` into the file and the dataset.
pub fn split_dataset_path(path: &Path) -> (PathBuf, Option<String>) {
    let s = path.to_string_lossy();
    let lower = s.to_lowercase();
    for ext in [".h5:", ".hdf5:"] {
        if let Some(i) = lower.rfind(ext) {
            let cut = i + ext.len() - 1;
            let ds = s[cut + 1..].to_string();
            return (PathBuf::from(&s[..cut]), if ds.is_empty() { None } else { Some(ds) });
        }
    }
    (path.to_path_buf(), None)
}

/// Rounds to the nearest integer and clamps to [0, 65535] (NaN → 0). Writers check the
/// range first ([`check_output_range`]), so the clamp never changes a value.
pub fn to_u16(v: f32) -> u16 {
    if v.is_nan() {
        0
    } else {
        v.round().clamp(0.0, 65535.0) as u16
    }
}
