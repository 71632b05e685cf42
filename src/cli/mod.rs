//! The command-line front end: argument parsing and printing only; the work is done by
//! the library.

pub mod args;
pub mod compare;
pub mod convert;
pub mod core;
pub mod demo;
pub mod imaging;
pub mod infer;
pub mod slurm;
pub mod train;

pub use rln_engine::args::{finite_f32, finite_f64};
