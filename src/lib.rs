//! rln-engine: the Richardson–Lucy Network (Li et al., Nature Methods 2022) with
//! hand-written forward and backward passes.
//!
//! Layers, from the bottom (each uses only those below it; tests/layering.rs checks it):
//! - [`error`], [`real`], [`tensor`], [`fsutil`]: the error type, the scalar types, the
//!   host tensor, safe file writing.
//! - [`model`]: the layer table of the spec, the model file, TF import, initialization;
//!   [`imaging`]: volume I/O, PSFs, synthetic data, Richardson–Lucy, metrics;
//!   [`args`]: the commands' argument parsers and checks.
//! - [`backend`]: the ops interface (every op returns [`Result`]) and the training loss;
//!   [`backend::cpu`] is the exact reference (the oracle), [`backend::cuda`] the GPU.
//! - [`net`]: the network of rln-spec.md §3, forward and backward, against that interface.
//! - [`train`]: Adam, crops, the training loop, checkpoints, the `train` command;
//!   [`infer`]: tiled and streaming inference; [`conformance`]: comparison with the
//!   authors' TensorFlow test vectors.
//! - [`bench`](mod@bench): throughput of the main paths; [`compare`]: RLN vs Richardson–Lucy;
//!   [`slurm`]: job-array scripts that spread one volume over a Slurm cluster;
//!   [`demo`]: the two-command demo.
//!
//! A program that wants deconvolved volumes needs a model, a predictor and one call
//! ([`infer::deconvolve`]: normalization, tiling, blending, rescaling):
//! ```no_run
//! use rln_engine::{imaging::io, infer::{deconvolve, CpuPredictor}, model::Model};
//! let model: Model<f32> = Model::load("model.safetensors".as_ref())?;
//! let raw = io::read_volume("stack.tif")?;
//! let mut cpu = CpuPredictor { model: model.clone() };
//! let restored = deconvolve(&mut cpu, &model, &raw, [256, 256, 256])?;
//! io::write_volume("restored.tif", &restored, io::OutputDtype::F32)?;
//! # Ok::<(), rln_engine::Error>(())
//! ```
//! With the `CudaPredictor` of [`backend::cuda`] (a GPU at run time) the same call runs
//! on the GPU. The layers below are public too: [`net::Rln`] runs the network on
//! normalized tensors with any [`backend::Backend`].

pub mod args;
pub mod backend;
pub mod bench;
pub mod compare;
pub mod conformance;
pub mod demo;
pub mod error;
pub mod fsutil;
pub mod imaging;
pub mod infer;
pub mod model;
pub mod net;
pub mod real;
pub mod slurm;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};

/// Sets the number of CPU threads for all parallel work (0: one per core). Call once,
/// before any other work; later calls are ignored.
pub fn set_threads(n: usize) {
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
}

/// The number of threads parallel work runs on.
pub fn threads() -> usize {
    rayon::current_num_threads()
}
