//! Adam as TF1 implements it, with the authors' learning-rate schedule (spec §5): the
//! arithmetic lives in [`crate::backend::optim`], below the network, because every
//! backend's resident optimizer state implements it; re-exported here for the trainer.

pub use crate::backend::optim::{lr_t, Adam, LrSchedule, BETA1, BETA2, EPSILON};
