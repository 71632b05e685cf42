//! The argument checks of every subcommand live in the library ([`rln_engine::args`]),
//! so that the bindings' commands (Python's `rln_engine.train`) check the same.

pub use rln_engine::args::*;
