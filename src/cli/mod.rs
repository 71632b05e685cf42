//! The command-line front end: argument parsing and printing only; the work is done by
//! the library.

pub mod core;
pub mod imaging;
pub mod train;
pub mod infer;
