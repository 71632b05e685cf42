//! The CPU twin of every CUDA kernel: the same fused stage computed with the reference
//! ops of backend::cpu, composed exactly as `net::Rln::forward` composes them. The
//! differential tests (tests/gpu.rs, and the emulation tests here) compare each kernel
//! with its twin on fresh random inputs.

use super::launch::{conv_kernel, Epi};
use super::weights::bn_affine;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Addend, Backend, Epilogue};
use crate::error::Result;
use crate::model::{Model, L};
use crate::tensor::Tensor;

/// What one conv stage produces: its output (a C_out-channel activation, or the
/// one-channel node of the fused epilogue) and, for the update stages, E_raw.
pub struct StageOut {
    pub out: Tensor<f32>,
    pub raw: Option<Tensor<f32>>,
}

fn affine_f32(model: &Model<f32>, l: L) -> (Vec<f32>, Vec<f32>) {
    let (s, t) = bn_affine(model, l);
    (
        s.iter().map(|&v| v as f32).collect(),
        t.iter().map(|&v| v as f32).collect(),
    )
}

/// The CPU twin of the conv kernel of layer `l`: conv over `inputs` (concatenated), BN,
/// softplus, then the kernel's fused epilogue; `aux` is the epilogue's one-channel
/// operand (xd or x for the divisions, x or E1 for the updates).
pub fn conv_stage(model: &Model<f32>, l: L, inputs: &[&Tensor<f32>], aux: Option<&Tensor<f32>>) -> Result<StageOut> {
    let b = CpuBackend::<f32>::new();
    let k = conv_kernel(l);
    let w = &model.params.layers[l as usize].weight;
    let (scale, shift) = affine_f32(model, l);
    let conv = |addend| {
        b.conv3(
            inputs,
            w,
            k.c_out,
            &Epilogue {
                scale: &scale,
                shift: &shift,
                softplus: true,
                addend,
            },
        )
    };
    let post = |t: &Tensor<f32>, softplus: bool| {
        let (s, h) = affine_f32(model, k.post.expect("stage with a post batch norm"));
        b.epilogue(
            t,
            &Epilogue {
                scale: &s,
                shift: &h,
                softplus,
                addend: Addend::None,
            },
        )
    };
    let aux = || aux.expect("this stage needs its one-channel operand");
    Ok(match k.epi {
        Epi::Sp => StageOut {
            out: conv(Addend::None)?,
            raw: None,
        },
        Epi::FpDiv => {
            let fp = conv(Addend::SoftplusOf(aux()))?;
            let q = b.rl_divide(aux(), &fp, model.config.div_eps)?;
            StageOut {
                out: post(&q, false)?,
                raw: None,
            }
        }
        Epi::Update | Epi::UpdatePlus1 => {
            let addend = if k.epi == Epi::UpdatePlus1 {
                Addend::Const(1.0)
            } else {
                Addend::None
            };
            let bp = conv(addend)?;
            let e = b.rl_update(aux(), &bp)?;
            StageOut {
                out: post(&e, true)?,
                raw: Some(e),
            }
        }
        Epi::Mean => StageOut {
            out: b.channel_mean(&conv(Addend::None)?)?,
            raw: None,
        },
    })
}

/// The CPU twin of the up2 kernel: u = sp(BN7(up2(b3))).
pub fn up_stage(model: &Model<f32>, b3: &Tensor<f32>) -> Result<Tensor<f32>> {
    let b = CpuBackend::<f32>::new();
    let (scale, shift) = affine_f32(model, L::H1BpUp);
    let w = &model.params.layers[L::H1BpUp as usize].weight;
    b.up2(
        b3,
        w,
        L::H1BpUp.spec().c_out,
        &Epilogue {
            scale: &scale,
            shift: &shift,
            softplus: true,
            addend: Addend::None,
        },
    )
}

/// The CPU twin of the avgpool2 kernel.
pub fn pool_stage(x: &Tensor<f32>) -> Result<Tensor<f32>> {
    CpuBackend::<f32>::new().avgpool2(x)
}
