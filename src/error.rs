//! The library's one error type. Messages say what was wrong and what to do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its content is not what it should be (corrupt, truncated,
    /// missing or mis-shaped tensors, unknown format version...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A value given by the caller is out of range or inconsistent with another.
    #[error("{0}")]
    InvalidInput(String),
    /// Tensor shapes that must agree do not.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// Model weights or config are unusable (NaN, wrong variant, ...).
    #[error("model: {0}")]
    Model(String),
    /// The CUDA driver, a kernel launch or device memory failed.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// Device memory ran out; the caller may retry with smaller tiles.
    #[error("CUDA out of memory: {0}")]
    CudaOutOfMemory(String),
    /// Training diverged or produced non-finite values.
    #[error("numeric: {0}")]
    Numeric(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }
    /// True for [`Error::CudaOutOfMemory`]: retrying with smaller tiles may succeed.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::CudaOutOfMemory(_))
    }
}
