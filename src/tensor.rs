//! A dense host tensor in N×C×D×H×W order (batch, channels, z, y, x), x fastest.

use crate::error::{Error, Result};
use crate::real::Real;

/// Extent of a 5-D tensor: batch, channels, depth (z), height (y), width (x).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub n: usize,
    pub c: usize,
    pub d: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    pub const fn new(n: usize, c: usize, d: usize, h: usize, w: usize) -> Self {
        Shape { n, c, d, h, w }
    }
    /// Voxels of one channel of one volume.
    pub const fn spatial(&self) -> usize {
        self.d * self.h * self.w
    }
    pub const fn len(&self) -> usize {
        self.n * self.c * self.spatial()
    }
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub const fn with_c(&self, c: usize) -> Self {
        Shape { c, ..*self }
    }
    /// Offset of the first voxel of channel `c` of volume `n`.
    pub const fn plane(&self, n: usize, c: usize) -> usize {
        (n * self.c + c) * self.spatial()
    }
    pub fn dims(&self) -> [usize; 3] {
        [self.d, self.h, self.w]
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}×{}×{}×{}×{}", self.n, self.c, self.d, self.h, self.w)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T> {
    pub shape: Shape,
    pub data: Vec<T>,
}

impl<T: Real> Tensor<T> {
    pub fn zeros(shape: Shape) -> Self {
        Tensor {
            shape,
            data: vec![T::zero(); shape.len()],
        }
    }
    pub fn filled(shape: Shape, v: T) -> Self {
        Tensor {
            shape,
            data: vec![v; shape.len()],
        }
    }
    pub fn from_vec(shape: Shape, data: Vec<T>) -> Result<Self> {
        if data.len() != shape.len() {
            return Err(Error::Shape(format!(
                "{} values given for a tensor of shape {shape} ({} values)",
                data.len(),
                shape.len()
            )));
        }
        Ok(Tensor { shape, data })
    }
    /// One channel plane (D·H·W values) of volume `n`.
    pub fn plane(&self, n: usize, c: usize) -> &[T] {
        let s = self.shape.spatial();
        &self.data[self.shape.plane(n, c)..][..s]
    }
    pub fn plane_mut(&mut self, n: usize, c: usize) -> &mut [T] {
        let s = self.shape.spatial();
        let o = self.shape.plane(n, c);
        &mut self.data[o..o + s]
    }
    /// Converts element type (f32 ↔ f64).
    pub fn cast<U: Real>(&self) -> Tensor<U> {
        Tensor {
            shape: self.shape,
            data: self.data.iter().map(|v| U::of(v.f64())).collect(),
        }
    }
    /// Converts N×D×H×W×C (channels-last, as TF stores it) to this layout.
    pub fn from_ndhwc(shape: Shape, data: &[T]) -> Result<Self> {
        if data.len() != shape.len() {
            return Err(Error::Shape(format!(
                "{} values for an NDHWC tensor of shape {shape}",
                data.len()
            )));
        }
        let mut t = Tensor::zeros(shape);
        let s = shape.spatial();
        for n in 0..shape.n {
            for v in 0..s {
                for c in 0..shape.c {
                    t.data[shape.plane(n, c) + v] = data[(n * s + v) * shape.c + c];
                }
            }
        }
        Ok(t)
    }
    pub fn to_ndhwc(&self) -> Vec<T> {
        let sh = self.shape;
        let s = sh.spatial();
        let mut out = vec![T::zero(); sh.len()];
        for n in 0..sh.n {
            for c in 0..sh.c {
                for v in 0..s {
                    out[(n * s + v) * sh.c + c] = self.data[sh.plane(n, c) + v];
                }
            }
        }
        out
    }
    pub fn all_finite(&self) -> bool {
        self.data.iter().all(|v| v.is_finite())
    }
}

/// Relative L2 error ‖a − r‖ / ‖r‖ (the conformance metric of reference/README.md).
pub fn rel_l2<A: Real, B: Real>(a: &[A], r: &[B]) -> f64 {
    assert_eq!(a.len(), r.len(), "rel_l2 of slices of different lengths");
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (x, y) in a.iter().zip(r) {
        let (x, y) = (x.f64(), y.f64());
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
