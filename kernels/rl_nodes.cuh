// The Richardson–Lucy nodes (rln-spec §3) of training, forward and backward side by side
// (TrainArgs, f32, channels-last): the channel mean cm, the division q = a / (cm(fp) + ε)
// and the update e = a · cm(bp). Inference fuses these nodes into its conv epilogues
// (rln_common.cuh rln_epilogue_voxel: EPI_FP_DIV, EPI_UPDATE*, EPI_MEAN).
#pragma once
#include "train_common.cuh"

// out[0][v] = (Σ_c in[0][v][c]) · (1/C); count = voxels.
__device__ __forceinline__ void channel_mean(const TrainArgs& a) {
    const int C = a.ca;
    const float inv = 1.0f / (float)C;
    RLN_GRID_STRIDE(v, a.count) {
        float s = 0.0f;
        for (int c = 0; c < C; ++c) s += a.in[0][v * C + c];
        a.out[0][v] = s * inv;
    }
}

// out[0][v][c] = in[0][v] · (1/C); count = voxels · C.
__device__ __forceinline__ void channel_mean_bwd(const TrainArgs& a) {
    const int C = a.ca;
    const float inv = 1.0f / (float)C;
    RLN_GRID_STRIDE(e, a.count) { a.out[0][e] = a.in[0][e / C] * inv; }
}

__device__ __forceinline__ float rln_cmean(const float* t, long long v, int C) {
    float s = 0.0f;
    for (int c = 0; c < C; ++c) s += t[v * C + c];
    return s * (1.0f / (float)C);
}

// q = a / (cm(fp) + eps): in[0] = a (1 ch), in[1] = fp (ca ch), f[0] = eps; count = voxels.
__device__ __forceinline__ void rl_divide(const TrainArgs& a) {
    RLN_GRID_STRIDE(v, a.count) { a.out[0][v] = a.in[0][v] / (rln_cmean(a.in[1], v, a.ca) + a.f[0]); }
}

// Gradients of q = a / (b + eps), b = cm(fp) (rln-spec §5): in[0] = a, in[1] = fp,
// in[2] = dq; out[0] = ∂a, out[1] = ∂fp (ca ch); mode 0 exact, 1 paper.
__device__ __forceinline__ void rl_divide_bwd(const TrainArgs& a) {
    const int C = a.ca;
    const float inv = 1.0f / (float)C;
    RLN_GRID_STRIDE(v, a.count) {
        const float den = rln_cmean(a.in[1], v, C) + a.f[0];
        const float q = a.in[0][v] / den;
        const float g = a.in[2][v];
        float da, db;
        if (a.mode == 0) {
            da = g / den;
            db = -q / den * g;
        } else {
            da = g;
            db = -q * q * g;
        }
        a.out[0][v] = da;
        const float dfp = db * inv;
        for (int c = 0; c < C; ++c) a.out[1][v * C + c] = dfp;
    }
}

// e = cm(bp) · a: in[0] = a (1 ch), in[1] = bp (ca ch); count = voxels.
__device__ __forceinline__ void rl_update(const TrainArgs& a) {
    RLN_GRID_STRIDE(v, a.count) { a.out[0][v] = rln_cmean(a.in[1], v, a.ca) * a.in[0][v]; }
}

// Gradients of e = a · cm(bp): in[0] = a, in[1] = bp, in[2] = de; out[0] = ∂a
// (exact cm(bp)·de, paper de), out[1] = ∂bp = a·de / C; mode 0 exact, 1 paper.
__device__ __forceinline__ void rl_update_bwd(const TrainArgs& a) {
    const int C = a.ca;
    const float inv = 1.0f / (float)C;
    RLN_GRID_STRIDE(v, a.count) {
        const float g = a.in[2][v];
        a.out[0][v] = a.mode == 0 ? rln_cmean(a.in[1], v, C) * g : g;
        const float dbp = (a.in[0][v] * g) * inv;
        for (int c = 0; c < C; ++c) a.out[1][v * C + c] = dbp;
    }
}
