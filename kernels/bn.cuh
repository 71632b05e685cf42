// Batch norm and the conv epilogue of training (rln-spec §4, batch statistics), forward
// and backward side by side (TrainArgs, f32, channels-last):
//   bn_epilogue        y = act(scale·z + shift) + addend   (t_epilogue)
//   bn_chan_sum        Σx, Σ(x−μ)² per channel: the two-pass batch statistics (t_chan_sum) of a
//                      batch norm whose input no conv produced (the conv epilogue sums the others)
//   bn_epilogue_bwd1/2 the gradient through softplus and batch norm (t_epi_bwd1, t_epi_bwd2)
// Inference folds batch norm into the conv weights on the host (no kernel of its own).
#pragma once
#include "train_common.cuh"

// out[0] = act(p0[c]·z + p1[c]) + addend; in[0] = z (C = ca channels), in[3] = addend tensor;
// p0, p1 (scale, shift) from wt on the device when set (rln_bn_param).
__device__ __forceinline__ void bn_epilogue(const TrainArgs& a) {
    const int C = a.ca;
    RLN_GRID_STRIDE(e, a.count) {
        const int c = (int)(e % C);
        a.out[0][e] = rln_train_epi_with(a, a.in[0][e], rln_bn_param(a, 0, c), rln_bn_param(a, 1, c), e / C);
    }
}

// Batch norm folded on the device (the host's arithmetic in net::Rln's training unit, in
// f64 with rounded intrinsics, so the f32 results are the host's bits): for channel c < ca,
// with mean = stat[c], var = stat[ca + c] (the reduced batch statistics) and γ = in[0][c],
// β = in[1][c] (the master weights): inv_std = 1/√(var + ε) (dc[0] = ε),
// out[0] = [scale (16) | shift (16) | γ (16) | β (16) | mean (16) | inv_std (16)] (f32):
// scale = γ·inv_std, shift = β − mean·γ·inv_std; the forward epilogue reads the first 32
// values, the backward pass the last 64 (t_epilogue, t_epi_bwd1/2 with wt set). One block.
// Mode 1: stat[ca + c] holds E[z²] (the conv epilogue's sums, RLN_EPI_STATS); the biased
// variance max(E[z²] − mean², 0) replaces it there first (what the running statistics read).
__device__ __forceinline__ void bn_fold(const TrainArgs& a) {
    const int c = threadIdx.x;
    if (blockIdx.x != 0 || c >= a.ca) return;
    const double mean = a.stat[c];
    if (a.mode == 1) a.stat[a.ca + c] = fmax(__dsub_rn(a.stat[a.ca + c], __dmul_rn(mean, mean)), 0.0);
    const double var = a.stat[a.ca + c];
    const double g = (double)a.in[0][c], b = (double)a.in[1][c];
    const double inv_std = __ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(var, a.dc[0])));
    const double gi = __dmul_rn(g, inv_std);
    float* o = a.out[0];
    o[c] = (float)gi;
    o[16 + c] = (float)__dsub_rn(b, __dmul_rn(__dmul_rn(mean, g), inv_std));
    o[32 + c] = a.in[0][c];
    o[48 + c] = a.in[1][c];
    o[64 + c] = (float)mean;
    o[80 + c] = (float)inv_std;
}

// Per-channel sums of one tensor (ca = C channels, a power of two ≤ 16): mode 0 Σ x,
// mode 1 Σ (x − stat[c])². part[block][C]; count = elements.
__device__ __forceinline__ void bn_chan_sum(const TrainArgs& a) {
    __shared__ double sred[8 * 32];
    const int C = a.ca;
    const int c = threadIdx.x % C;
    const double mu = a.mode == 1 ? a.stat[c] : 0.0;
    double s = 0.0;
    RLN_GRID_STRIDE(e, a.count) {
        const double v = (double)a.in[0][e];
        s += a.mode == 1 ? (v - mu) * (v - mu) : v;
    }
    rln_block_sum_by_channel(s, C, a.part + (long long)blockIdx.x * C, sred);
}

// Pass 1 of the epilogue gradient (rln-spec §4 batch norm in training mode, then softplus):
// x̂ = (z − mean)·inv_std, dh = dy·σ(γ·x̂ + β) (softplus, mode bit 0) or dy; out[0] = dh;
// with mode bit 1 (batch norm) the per-channel sums Σ dh, Σ dh·x̂ go to part[block][2C].
// in[0] = z, in[1] = dy; p[0..3] = γ, β, mean, inv_std (1, 0, 0, 1 without batch norm), or
// from wt on the device (rln_bn_param; t_bn_fold's last 64 values).
__device__ __forceinline__ void bn_epilogue_bwd1(const TrainArgs& a) {
    __shared__ double sred[8 * 32];
    const int C = a.ca;
    const int c = threadIdx.x % C;
    const float gamma = rln_bn_param(a, 0, c), beta = rln_bn_param(a, 1, c), mean = rln_bn_param(a, 2, c),
                inv_std = rln_bn_param(a, 3, c);
    const bool sp = a.mode & 1;
    double s1 = 0.0, s2 = 0.0;
    RLN_GRID_STRIDE(e, a.count) {
        const float xh = (a.in[0][e] - mean) * inv_std;
        const float dh = sp ? a.in[1][e] * rln_sigmoid(gamma * xh + beta) : a.in[1][e];
        a.out[0][e] = dh;
        s1 += (double)dh;
        s2 += (double)(dh * xh);
    }
    if (a.mode & 2) {
        rln_block_sum_by_channel(s1, C, a.part + (long long)blockIdx.x * 2 * C, sred);
        rln_block_sum_by_channel(s2, C, a.part + (long long)blockIdx.x * 2 * C + C, sred);
    }
}

// Pass 2: ∂z = γ·inv_std·(dh − Σdh/m − x̂·Σ(dh·x̂)/m), in place on out[0] = dh; in[0] = z;
// stat = [Σ dh (C), Σ dh·x̂ (C)]; dc[0] = m (voxels per channel).
__device__ __forceinline__ void bn_epilogue_bwd2(const TrainArgs& a) {
    const int C = a.ca;
    RLN_GRID_STRIDE(e, a.count) {
        const int c = (int)(e % C);
        const float g = rln_bn_param(a, 0, c), mu = rln_bn_param(a, 2, c), is = rln_bn_param(a, 3, c);
        const float k = g * is;
        const float mb = (float)(a.stat[c] / a.dc[0]), mg = (float)(a.stat[C + c] / a.dc[0]);
        const float xh = (a.in[0][e] - mu) * is;
        a.out[0][e] = k * (a.out[0][e] - mb - xh * mg);
    }
}
