//! The weights as the kernels read them. Inference uses the running statistics, so each
//! batch norm is an affine map that folds into the conv before it: W'[o] = W[o]·scale[o],
//! bias[o] = shift[o] (scale = γ/√(var + ε), shift = β − mean·scale, computed in f64 as
//! `net::Rln` does). Then the layouts of the two conv families and of up2.

use super::launch::{mma_chunks, mma_k_row};
use super::train_launch::pack_fwd;
use super::Precision;
use crate::model::{LayerOp, Model, L};

/// Per-channel (scale, shift) of layer `l`'s batch norm with running statistics;
/// (1, 0) for the layers without batch norm (h3.conv1, h3.conv2).
pub fn bn_affine(model: &Model<f32>, l: L) -> (Vec<f64>, Vec<f64>) {
    let i = l as usize;
    let spec = l.spec();
    let p = &model.params.layers[i];
    if p.gamma.is_empty() {
        return (vec![1.0; spec.c_out], vec![0.0; spec.c_out]);
    }
    let eps = model.config.bn_eps;
    let (rm, rv) = (&model.running.mean[i], &model.running.var[i]);
    let scale: Vec<f64> = (0..p.gamma.len())
        .map(|c| p.gamma[c] as f64 / (rv[c] as f64 + eps).sqrt())
        .collect();
    let shift = (0..p.gamma.len())
        .map(|c| p.beta[c] as f64 - rm[c] as f64 * scale[c])
        .collect();
    (scale, shift)
}

/// The one-channel batch norm of an RL node layer (h1.dv, h1.e, h2.dv, h2.e) as (scale, shift).
pub fn post_bn(model: &Model<f32>, l: L) -> (f32, f32) {
    assert_eq!(
        l.spec().op,
        LayerOp::BnOnly,
        "{} is not a batch-norm-only layer",
        l.spec().name
    );
    let (s, t) = bn_affine(model, l);
    (s[0] as f32, t[0] as f32)
}

/// A conv layer with its batch norm folded in: engine layout [out][in][27].
#[derive(Clone, Debug)]
pub struct FoldedConv {
    pub c_in: usize,
    pub c_out: usize,
    pub weight: Vec<f64>,
    pub bias: Vec<f64>,
}

impl FoldedConv {
    pub fn w(&self, o: usize, ci: usize, tap: usize) -> f64 {
        self.weight[(o * self.c_in + ci) * 27 + tap]
    }
    pub fn bias_f32(&self) -> Vec<f32> {
        self.bias.iter().map(|&b| b as f32).collect()
    }
}

pub fn fold_conv(model: &Model<f32>, l: L) -> FoldedConv {
    let spec = l.spec();
    assert_eq!(spec.op, LayerOp::Conv3, "{} is not a 3×3×3 conv", spec.name);
    let ic = model.config.variant.input_channels();
    let (c_in, c_out) = (spec.c_in_for(ic), spec.c_out);
    let (scale, shift) = bn_affine(model, l);
    let w = &model.params.layers[l as usize].weight;
    let weight = (0..c_out * c_in * 27)
        .map(|i| w[i] as f64 * scale[i / (c_in * 27)])
        .collect();
    FoldedConv {
        c_in,
        c_out,
        weight,
        bias: shift,
    }
}

/// The FP32-core kernels' layout: [ci][tap][co], co fastest (conv3_tile.cuh); the one
/// packing of the training convs too ([`pack_fwd`], which this is).
pub fn ffma_layout(f: &FoldedConv) -> Vec<f32> {
    let w: Vec<f32> = f.weight.iter().map(|&v| v as f32).collect();
    pack_fwd(&w, f.c_in, f.c_out)
}

/// Element (k, n) of the B matrix (K × N = 16 × 8) of K chunk `chunk` in the layout of
/// C_in ([`mma_k_row`], conv3_mma.cuh); zero for padding rows and for the columns
/// n ≥ C_out (C_out = 4).
pub fn mma_b_value(f: &FoldedConv, chunk: usize, k: usize, n: usize) -> f64 {
    match mma_k_row(f.c_in, chunk, k) {
        Some((tap, ci)) if n < f.c_out => f.w(n, ci, tap),
        _ => 0.0,
    }
}

/// B fragments of mma.m16n8k16 for every K chunk, [chunk][lane][2] words of two values
/// of the 16-bit type `p` (fp16 or bf16, rounded to nearest even as cvt.rn): lane
/// (g = lane/4, t = lane%4) holds B[2t][g], B[2t+1][g] in word 0 (the lower k in the
/// low half) and B[2t+8][g], B[2t+9][g] in word 1 (PTX ISA, "Matrix Fragments for
/// mma.m16n8k16 with floating point type").
pub fn pack_mma_b(f: &FoldedConv, p: Precision) -> Vec<u32> {
    assert!(
        f.c_out == 8 || f.c_out == 4,
        "the tensor-core kernels have C_out = 4 or 8"
    );
    let nch = mma_chunks(f.c_in);
    let mut out = Vec::with_capacity(nch * 64);
    let bits = |v: f64| p.bits16(v as f32) as u32;
    let pair = |chunk: usize, k: usize, n: usize| {
        bits(mma_b_value(f, chunk, k, n)) | bits(mma_b_value(f, chunk, k + 1, n)) << 16
    };
    for chunk in 0..nch {
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            out.push(pair(chunk, 2 * t, g));
            out.push(pair(chunk, 2 * t + 8, g));
        }
    }
    out
}

/// The transposed conv with its batch norm folded: engine layout [in][out][2][2][2]
/// scaled per output channel, and the bias.
pub fn fold_up(model: &Model<f32>) -> (Vec<f32>, Vec<f32>) {
    let spec = L::H1BpUp.spec();
    let (ci, co) = (spec.c_in, spec.c_out);
    let (scale, shift) = bn_affine(model, L::H1BpUp);
    let w = &model.params.layers[L::H1BpUp as usize].weight;
    let out = (0..ci * co * 8)
        .map(|i| (w[i] as f64 * scale[(i / 8) % co]) as f32)
        .collect();
    (out, shift.iter().map(|&s| s as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::launch::CONV_KERNELS;
    use crate::backend::cuda::random_model;

    /// The inference weights go through the training convs' packing: the same layout as
    /// the index formula conv3_tile.cuh reads (`w[(ci·27 + tap)·C_out + co]`), for every
    /// conv of the network (the oracle is the formula of the inference packing this
    /// replaced).
    #[test]
    fn one_packing_for_inference_and_training() {
        let model = random_model(9);
        for k in CONV_KERNELS.iter() {
            let f = fold_conv(&model, k.layer);
            let packed = ffma_layout(&f);
            assert_eq!(packed.len(), f.c_in * 27 * f.c_out);
            for o in 0..f.c_out {
                for ci in 0..f.c_in {
                    for tap in 0..27 {
                        assert_eq!(
                            packed[(ci * 27 + tap) * f.c_out + o],
                            f.w(o, ci, tap) as f32,
                            "{} weight ({o}, {ci}, {tap})",
                            k.base
                        );
                    }
                }
            }
        }
    }
}
