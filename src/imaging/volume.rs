//! The one in-memory volume type of the imaging toolkit: a dense z,y,x stack of f32
//! with its voxel size and free-form metadata.

use crate::error::{Error, Result};

/// A 3D stack, z-major (`data[(z * ny + y) * nx + x]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Volume {
    /// (z, y, x) sizes in voxels.
    pub dims: [usize; 3],
    pub data: Vec<f32>,
    /// (z, y, x) voxel size in `unit` (µm for everything this crate writes).
    pub voxel_size: Option<[f64; 3]>,
    /// Unit of `voxel_size`: "micron" unless a file said otherwise and could not be converted.
    pub unit: String,
    /// Free-form JSON carried with the volume (e.g. the parameters of a PSF).
    pub metadata: Option<String>,
}

impl Volume {
    /// A volume over `data`, which must hold exactly `dims[0]·dims[1]·dims[2]` values.
    pub fn new(dims: [usize; 3], data: Vec<f32>) -> Result<Self> {
        let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n != Some(data.len()) {
            return Err(Error::Shape(format!(
                "volume of {}×{}×{} voxels needs {} values, got {}",
                dims[0],
                dims[1],
                dims[2],
                n.map(|n| n.to_string()).unwrap_or_else(|| "too many".into()),
                data.len()
            )));
        }
        Ok(Volume {
            dims,
            data,
            voxel_size: None,
            unit: "micron".into(),
            metadata: None,
        })
    }

    pub fn zeros(dims: [usize; 3]) -> Self {
        Volume {
            dims,
            data: vec![0.0; dims[0] * dims[1] * dims[2]],
            voxel_size: None,
            unit: "micron".into(),
            metadata: None,
        }
    }

    /// A volume of the same shape, voxel size and unit as `self`, holding `data`.
    pub fn like(&self, data: Vec<f32>) -> Result<Self> {
        let mut v = Volume::new(self.dims, data)?;
        v.voxel_size = self.voxel_size;
        v.unit = self.unit.clone();
        Ok(v)
    }

    pub fn with_voxel_size(mut self, voxel_size: [f64; 3]) -> Self {
        self.voxel_size = Some(voxel_size);
        self.unit = "micron".into();
        self
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    #[inline]
    pub fn index(&self, z: usize, y: usize, x: usize) -> usize {
        (z * self.dims[1] + y) * self.dims[2] + x
    }

    #[inline]
    pub fn at(&self, z: usize, y: usize, x: usize) -> f32 {
        self.data[self.index(z, y, x)]
    }

    /// Sum of all voxels (f64 accumulation).
    pub fn sum(&self) -> f64 {
        self.data.iter().map(|&v| v as f64).sum()
    }

    /// "Z×Y×X" for messages.
    pub fn shape_str(&self) -> String {
        dims_str(self.dims)
    }

    /// The first non-finite voxel as (z, y, x, value), if any.
    pub fn first_non_finite(&self) -> Option<([usize; 3], f32)> {
        let i = self.data.iter().position(|v| !v.is_finite())?;
        let (ny, nx) = (self.dims[1], self.dims[2]);
        Some(([i / (ny * nx), (i / nx) % ny, i % nx], self.data[i]))
    }

    /// Errors with the position of the first NaN or infinite voxel.
    pub fn check_finite(&self, what: &str) -> Result<()> {
        match self.first_non_finite() {
            None => Ok(()),
            Some(([z, y, x], v)) => Err(Error::invalid(format!(
                "{what}: voxel (z={z}, y={y}, x={x}) is {v}; volumes must hold finite values only \
                 (replace NaN/Inf, e.g. with 0, before using this file)"
            ))),
        }
    }

    /// Errors (a [`Error::Numeric`]) when a computed result holds NaN or infinity, naming
    /// the stage that produced it, so that no such volume is ever written.
    pub fn check_finite_result(&self, stage: &str) -> Result<()> {
        check_finite_result(&self.data, self.dims, stage)
    }

    /// Errors unless the voxel size, when present, is finite and positive.
    pub fn check_voxel_size(&self, what: &str) -> Result<()> {
        check_voxel_size(self.voxel_size, what)
    }

    /// The sub-volume of size `dims` starting at `start`.
    pub fn crop(&self, start: [usize; 3], dims: [usize; 3]) -> Result<Volume> {
        for a in 0..3 {
            if start[a] + dims[a] > self.dims[a] {
                return Err(Error::Shape(format!(
                    "crop of {} at {:?} does not fit in {}",
                    dims_str(dims),
                    start,
                    self.shape_str()
                )));
            }
        }
        let mut out = Vec::with_capacity(dims[0] * dims[1] * dims[2]);
        for z in 0..dims[0] {
            for y in 0..dims[1] {
                let i = self.index(start[0] + z, start[1] + y, start[2]);
                out.extend_from_slice(&self.data[i..i + dims[2]]);
            }
        }
        let mut v = self.like_dims(dims, out);
        v.metadata = self.metadata.clone();
        Ok(v)
    }

    fn like_dims(&self, dims: [usize; 3], data: Vec<f32>) -> Volume {
        Volume {
            dims,
            data,
            voxel_size: self.voxel_size,
            unit: self.unit.clone(),
            metadata: None,
        }
    }
}

pub fn dims_str(d: [usize; 3]) -> String {
    format!("{}×{}×{}", d[0], d[1], d[2])
}

/// Errors (a [`Error::Numeric`]) when `data` (planes of `dims[1]×dims[2]`) holds NaN or
/// infinity: the result of `stage` is unusable and must not be written.
pub fn check_finite_result(data: &[f32], dims: [usize; 3], stage: &str) -> Result<()> {
    use rayon::prelude::*;
    let Some(i) = data.par_iter().position_first(|v| !v.is_finite()) else {
        return Ok(());
    };
    let bad = data.par_iter().filter(|v| !v.is_finite()).count();
    let (ny, nx) = (dims[1].max(1), dims[2].max(1));
    Err(Error::Numeric(format!(
        "the {stage} result is not finite: voxel (z={}, y={}, x={}) is {} ({bad} of {} voxels are NaN or infinite); \
         nothing was written. Check the model's weights and the input's range",
        i / (ny * nx),
        (i / nx) % ny,
        i % nx,
        data[i],
        data.len()
    )))
}

pub(crate) fn check_voxel_size(vs: Option<[f64; 3]>, what: &str) -> Result<()> {
    if let Some(v) = vs {
        if v.iter().any(|&s| !(s.is_finite() && s > 0.0)) {
            return Err(Error::invalid(format!(
                "{what}: voxel size (z, y, x) = ({}, {}, {}) must be positive and finite",
                v[0], v[1], v[2]
            )));
        }
    }
    Ok(())
}
