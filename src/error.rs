//! The library's one error type. Messages say what was wrong and what to do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written. `cause` is not a `#[source]`: the message
    /// already holds its text, and a chain printer (`{:#}`) would repeat it.
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
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
    /// An allocation failed: device memory ran out (CUDA_ERROR_OUT_OF_MEMORY) or a
    /// backend's memory limit was reached. The message says what was allocated and what
    /// to make smaller (tiles for inference, batch or crop for training); inference
    /// retries with smaller tiles by itself.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// Training diverged or produced non-finite values.
    #[error("numeric: {0}")]
    Numeric(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
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
    /// The same error, the same variant (so callers still tell out-of-memory from bad
    /// input), with `f` applied to its message.
    fn map_message(self, f: impl FnOnce(String) -> String) -> Error {
        match self {
            Error::Io { path, cause } => Error::Io {
                path,
                cause: std::io::Error::new(cause.kind(), f(cause.to_string())),
            },
            Error::Format { path, msg } => Error::Format { path, msg: f(msg) },
            Error::InvalidInput(m) => Error::InvalidInput(f(m)),
            Error::Shape(m) => Error::Shape(f(m)),
            Error::Model(m) => Error::Model(f(m)),
            Error::Cuda(m) => Error::Cuda(f(m)),
            Error::OutOfMemory(m) => Error::OutOfMemory(f(m)),
            Error::Numeric(m) => Error::Numeric(f(m)),
        }
    }
    /// What was being done, in front of the message ("reading checkpoint c.safetensors: …").
    pub fn context(self, what: impl std::fmt::Display) -> Error {
        self.map_message(|m| format!("{what}: {m}"))
    }
    /// A note after the message: what to do next.
    pub fn note(self, note: impl std::fmt::Display) -> Error {
        self.map_message(|m| format!("{m}\n{note}"))
    }
    /// True for [`Error::OutOfMemory`]: retrying with smaller tiles (or batch) may succeed.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::OutOfMemory(_))
    }
}

/// [`Error::context`] on a [`Result`], as `anyhow::Context` does for the binary.
pub trait ResultExt<T> {
    fn context(self, what: impl std::fmt::Display) -> Result<T>;
    fn with_context<D: std::fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn context(self, what: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| e.context(what))
    }
    fn with_context<D: std::fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| e.context(what()))
    }
}
