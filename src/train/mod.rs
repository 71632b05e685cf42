//! Training: the loss, Adam, and (later) crops, normalization and the loop.

pub mod adam;
pub mod command;
pub mod data;
pub mod loss;
pub mod trainer;
