// Conv forward on the FP32 cores (conv3_tile.cuh), both users:
//   inference  conv3_ffma<S, CA, CB, CC, COUT, EPI> (RlnArgs): storage S (f32 or f16),
//              folded batch-norm bias and the fused RL epilogues of rl_nodes.cuh; every
//              layer of the f32 network and the small layers of the f16 network
//   training   tconv_fwd<CA, CB, CC, COUT> (TrainArgs): f32, the general epilogue
//              (scale, shift, softplus, addend); with flipped, transposed weights (packed
//              on the host) it is also the data gradient (C_out of the layer → one input)
//   tconv_fwd_any: the training conv with run-time channel counts (any C_in, C_out ≤ 16),
//              one thread per (voxel, output channel): slow, for shapes without a kernel
// The kernels are instantiated by RLN_CONV_FFMA (kernels/h*.cu) and RLN_TCONV_FWD
// (kernels/train_conv.cu). Launch bounds differ: inference (256, 3) — three blocks per SM
// with registers capped at 80 — except the 1→8 convs (256, 2), which spill under that cap;
// training (256, 2) everywhere (its largest blocks need 54 KB of shared memory).
#pragma once
#include "rln_common.cuh"
#include "train_common.cuh"
#include "rl_nodes.cuh"
#include "conv3_tile.cuh"

// ---------------------------------------------------------------- inference

// Channel c of in0 ‖ in1 ‖ in2 (storage S, one-channel inputs f32).
template <typename S, int CA, int CB, int CC>
struct RlnConvLoad {
    const RlnArgs& a;
    __device__ __forceinline__ float operator()(long long vox, int c) const { return rln_load_concat<S, CA, CB, CC>(a, vox, c); }
};

// z + bias (the folded batch-norm shift), then the fused epilogue EPI.
template <typename S, int COUT, int EPI>
struct RlnConvEpi {
    const RlnArgs& a;
    float bias[COUT];
    __device__ __forceinline__ void begin() {
#pragma unroll
        for (int c = 0; c < COUT; ++c) bias[c] = a.bias[c];
    }
    __device__ __forceinline__ void voxel(long long vox, float* z) {
#pragma unroll
        for (int c = 0; c < COUT; ++c) z[c] += bias[c];
        rln_epilogue_voxel<EPI, S, COUT>(a, vox, z);
    }
    __device__ __forceinline__ void end() {}
};

template <typename S, int CA, int CB, int CC, int COUT, int EPI>
__device__ __forceinline__ void conv3_ffma(const RlnArgs& a) {
    static_assert(COUT == 4 || COUT == 8, "C_out is 4 or 8");
    const RlnConvLoad<S, CA, CB, CC> ld{a};
    RlnConvEpi<S, COUT, EPI> epi{a};
    conv3_tile<CA + CB + CC, COUT, 3>(static_cast<const float*>(a.wt), a.d, a.h, a.w, ld, epi);
}

// 3 blocks per SM (registers capped at 80) except for the 1→8 convs, which spill a few
// words under that cap and get 2 (their work per block is small).
#define RLN_FFMA_MIN_BLOCKS(CIN, COUT) ((CIN) == 1 && (COUT) == 8 ? 2 : 3)
#define RLN_CONV_FFMA(name, S, CA, CB, CC, COUT, EPI)                                              \
    extern "C" __global__ void __launch_bounds__(conv3::THREADS, RLN_FFMA_MIN_BLOCKS(CA + CB + CC, COUT)) \
        name(const RlnArgs a) {                                                                    \
        conv3_ffma<S, CA, CB, CC, COUT, EPI>(a);                                                   \
    }

// ---------------------------------------------------------------- training (and data gradient)

// Channel c of in[0] ‖ in[1] ‖ in[2], f32.
template <int CA, int CB, int CC>
struct TrainConvLoad {
    const TrainArgs& a;
    __device__ __forceinline__ float operator()(long long vox, int c) const {
        if (c < CA) return a.in[0][vox * CA + c];
        if (CB > 0 && c < CA + CB) return a.in[1][vox * CB + (c - CA)];
        if (CC > 0) return a.in[2][vox * CC + (c - CA - CB)];
        return 0.0f;
    }
};

// out[0][vox][c] = rln_train_epi(z[c]), 16-B stores where C_out allows. With
// RLN_EPI_STATS the batch statistics of the outputs: each thread sums y and y² (exact in
// f64) of its voxels in order, then end() reduces them over the block (one shuffle tree per
// value, warps in order) into part[block][2·C_out]; t_reduce_part sums the blocks in a fixed
// order. This replaces t_chan_sum's two passes over the activation.
template <int COUT>
struct TrainConvEpi {
    const TrainArgs& a;
    double s1[COUT] = {}, s2[COUT] = {};
    __device__ __forceinline__ void begin() {}
    __device__ __forceinline__ void voxel(long long vox, const float* z) {
        float o[COUT];
#pragma unroll
        for (int c = 0; c < COUT; ++c) o[c] = rln_train_epi(a, z[c], c, vox);
        if (a.mode & RLN_EPI_STATS) {
#pragma unroll
            for (int c = 0; c < COUT; ++c) {
                s1[c] += (double)o[c];
                s2[c] += (double)o[c] * (double)o[c];
            }
        }
        if (COUT % 4 == 0) {
            float4* dst = reinterpret_cast<float4*>(a.out[0] + vox * COUT);
#pragma unroll
            for (int q = 0; q < COUT / 4; ++q) dst[q] = make_float4(o[4 * q], o[4 * q + 1], o[4 * q + 2], o[4 * q + 3]);
        } else {
#pragma unroll
            for (int c = 0; c < COUT; ++c) a.out[0][vox * COUT + c] = o[c];
        }
    }
    __device__ __forceinline__ void end() {
        if (!(a.mode & RLN_EPI_STATS)) return;  // uniform over the block
        __shared__ double sred[8 * 32];
        double* dst = a.part + rln_block_linear() * 2 * COUT;
#pragma unroll
        for (int c = 0; c < COUT; ++c) {
            rln_block_sum_by_channel(s1[c], 1, dst + c, sred);
            rln_block_sum_by_channel(s2[c], 1, dst + COUT + c, sred);
        }
    }
};

// wt: [ci][kz][ky][kx][co] (train_launch::pack_fwd); out[0]: C_out channels.
template <int CA, int CB, int CC, int COUT>
__device__ __forceinline__ void tconv_fwd(const TrainArgs& a) {
    constexpr int CIN = CA + CB + CC;
    const TrainConvLoad<CA, CB, CC> ld{a};
    TrainConvEpi<COUT> epi{a};
    // one input channel: a fully unrolled pass hoists all 27·C_out weight loads and
    // spills (seen with 1→8 under (256, 2)); rolling kz keeps 9·C_out live
    conv3_tile<CIN, COUT, (CIN <= 2 ? 1 : 3)>(a.wt, a.d, a.h, a.w, ld, epi);
}

#define RLN_TCONV_FWD(CA, CB, CC, COUT)                                                                 \
    extern "C" __global__ void __launch_bounds__(256, 2) tconv_fwd_##CA##_##CB##_##CC##_##COUT(const TrainArgs a) { \
        tconv_fwd<CA, CB, CC, COUT>(a);                                                                 \
    }

// One thread per (voxel, output channel); weights [ci][27][co] as tconv_fwd. ca, cb, cc,
// cout: channel counts; n, d, h, w: the volume; count = voxels · cout.
__device__ __forceinline__ void tconv_fwd_rt(const TrainArgs& a) {
    const int cin = a.ca + a.cb + a.cc, cout = a.cout;
    RLN_GRID_STRIDE(e, a.count) {
        const int co = (int)(e % cout);
        const long long vox = e / cout;
        const int x = (int)(vox % a.w), y = (int)((vox / a.w) % a.h), z = (int)((vox / ((long long)a.w * a.h)) % a.d);
        const long long n = vox / ((long long)a.w * a.h * a.d);
        float acc = 0.0f;
        for (int ci = 0; ci < cin; ++ci) {
            const float* src;
            int cs, cl;
            if (ci < a.ca) { src = a.in[0]; cs = a.ca; cl = ci; }
            else if (ci < a.ca + a.cb) { src = a.in[1]; cs = a.cb; cl = ci - a.ca; }
            else { src = a.in[2]; cs = a.cc; cl = ci - a.ca - a.cb; }
            for (int k = 0; k < 27; ++k) {
                const int gz = z + k / 9 - 1, gy = y + (k / 3) % 3 - 1, gx = x + k % 3 - 1;
                if (gz < 0 || gz >= a.d || gy < 0 || gy >= a.h || gx < 0 || gx >= a.w) continue;
                const long long v = ((n * a.d + gz) * a.h + gy) * a.w + gx;
                acc = fmaf(a.wt[(ci * 27 + k) * cout + co], src[v * cs + cl], acc);
            }
        }
        a.out[0][e] = rln_train_epi(a, acc, co, vox);
    }
}
