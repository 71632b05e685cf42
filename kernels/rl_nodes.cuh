// The Richardson–Lucy nodes (rln-spec §3), inference and training side by side: the channel
// mean cm, the division q = a / (cm(fp) + ε) and the update e = a · cm(bp).
//   inference  fused into the conv epilogue: rln_epilogue_voxel (EPI_FP_DIV, EPI_UPDATE*,
//              EPI_MEAN; the FFMA convs of conv_ffma.cuh; the tensor-core convs of
//              conv3_mma.cuh compute the same from their accumulator layout)
//   training   forward and backward as separate kernels (TrainArgs, f32, channels-last)
#pragma once
#include "rln_common.cuh"
#include "train_common.cuh"

// ---------------------------------------------------------------- inference (fused)

// The epilogue for one voxel whose C_out pre-activations z (bias included) are all in
// this thread. Mirrors backend::cpu: channel means are the sum times 1/C.
template <int EPI, typename S, int COUT>
__device__ __forceinline__ void rln_epilogue_voxel(const RlnArgs& a, long long vox, float* z) {
    constexpr bool FAST = sizeof(S) == 2;
    const float inv = 1.0f / (float)COUT;
    if (EPI == EPI_SP) {
#pragma unroll
        for (int c = 0; c < COUT; ++c) z[c] = rln_sp<FAST>(z[c]);
        rln_store_voxel<S, COUT>(a.out, vox, z);
    } else if (EPI == EPI_FP_DIV) {
        const float av = a.aux[vox];
        const float spa = rln_sp<FAST>(av);
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < COUT; ++c) s += rln_sp<FAST>(z[c]) + spa;
        const float q = av / (s * inv + a.eps);
        static_cast<float*>(a.out)[vox] = q * a.post_scale + a.post_shift;
    } else if (EPI == EPI_UPDATE || EPI == EPI_UPDATE_PLUS1) {
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < COUT; ++c) s += rln_sp<FAST>(z[c]) + (EPI == EPI_UPDATE_PLUS1 ? 1.0f : 0.0f);
        const float e = (s * inv) * a.aux[vox];
        if (a.out_raw) a.out_raw[vox] = e;
        static_cast<float*>(a.out)[vox] = rln_sp<FAST>(e * a.post_scale + a.post_shift);
    } else if (EPI == EPI_MEAN) {
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < COUT; ++c) s += rln_sp<FAST>(z[c]);
        static_cast<float*>(a.out)[vox] = s * inv;
    }
}

// ---------------------------------------------------------------- training

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
