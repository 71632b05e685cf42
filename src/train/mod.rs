//! Training: Adam, the authors' crop sampler and normalization, the loop and its
//! checkpoints, and the `train` command (the loss itself is a backend op:
//! [`crate::backend::loss`]).

pub mod adam;
pub mod command;
pub mod data;
pub mod trainer;
