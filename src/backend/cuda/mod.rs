//! The CUDA backend. For now: the kernels build.rs embeds (PTX or CUDA source for NVRTC)
//! and a probe that loads them through cudarc; the fused kernels arrive with the CUDA
//! inference issue.

pub mod kernels;
