//! `rln-engine train`: its options and its run live in the library
//! ([`rln_engine::train::command`]), so that the bindings train exactly as the CLI does.

pub use rln_engine::train::command::{parse_dims, parse_range, train, TrainArgs};
