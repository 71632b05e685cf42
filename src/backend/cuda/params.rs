//! The parameters of one kernel launch, whichever kernel family it is: the inference
//! kernels' block ([`KernelArgs`]), the training kernels' ([`TrainArgs`]), or the three
//! values of the tile conversions ([`IoArgs`]). Shared by the device (which pushes them)
//! and the runtime (which traces and routes them), below both.

use super::launch::KernelArgs;
use super::train_launch::TrainArgs;

/// The parameters of one launch: inference kernels take [`KernelArgs`], training kernels
/// [`TrainArgs`], the f16↔f32 tile conversions (kernels/io_half.cu) three values.
#[derive(Clone, Copy, Debug)]
pub enum Params<'a> {
    Infer(&'a KernelArgs),
    Train(&'a TrainArgs),
    Io(&'a IoArgs),
}

/// The parameters of the conversion kernels `rln_h16_to_f32` and `rln_f32_to_h16`:
/// `dst[i] = convert(src[i])` for i < n (three kernel parameters, in this order).
#[derive(Clone, Copy, Debug)]
pub struct IoArgs {
    pub src: u64,
    pub dst: u64,
    pub n: i64,
}
