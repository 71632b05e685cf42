// Shared pieces of the training kernels (train_conv.cu, train_ops.cu): the one parameter
// block, deterministic block reductions, and the activation functions. Every training
// tensor is f32 and channels-last (N·D·H·W voxels × C), as in the inference kernels.
#pragma once
#include "rln_common.cuh"

// The one parameter block of every training kernel; the Rust twin is
// backend::cuda::train_launch::TrainArgs (same field order, checked size).
struct TrainArgs {
    const float* in[4];   // inputs (meaning per kernel)
    float* out[3];        // outputs
    const float* wt;      // weights (layout per kernel)
    double* part;         // per-block partial sums of reductions, [block][J]
    double* stat;         // f64 values on the device (means, sums): read by a later pass, written by t_reduce_part
    long long count;      // elements (or voxels) the kernel walks
    int n, d, h, w;       // batch and volume size (meaning per kernel)
    int ca, cb, cc, cout; // channels of in[0], in[1], in[2] and of the output
    int mode, k0, k1, k2; // flags, extra sizes (per kernel)
    float f[4];           // f32 scalars
    double dc[8];         // f64 scalars
    float p[4][16];       // per-channel f32 parameters (scale/shift, γ/β/mean/inv_std)
};
static_assert(sizeof(TrainArgs) == 472, "TrainArgs must match backend::cuda::train_launch::TrainArgs");

#define RLN_TRAIN_THREADS 256

// Epilogue flags in TrainArgs::mode (conv forward, up2 forward, epilogue): bit 0 softplus,
// bits 1-2 the addend: 0 none, 1 the constant f[0], 2 softplus of the one-channel in[3].
#define RLN_EPI_SOFTPLUS 1
#define RLN_ADD_SHIFT 1
#define RLN_ADD_NONE 0
#define RLN_ADD_CONST 1
#define RLN_ADD_SP 2
// Bit 3 (forward convs: tconv_fwd, tmma_fwd): the epilogue also writes the batch statistics
// of its outputs, part[block][2·C_out] = [Σ y (C_out) | Σ y² (C_out)] in f64, block =
// rln_block_linear() (backend::cuda::train_launch::EPI_STATS; reduced by t_reduce_part,
// turned into the variance by t_bn_fold mode 1).
#define RLN_EPI_STATS 8

// 1 / (1 + e^-t), stable for every t (the derivative of softplus).
__device__ __forceinline__ float rln_sigmoid(float t) {
    if (t >= 0.0f) return 1.0f / (1.0f + expf(-t));
    const float e = expf(t);
    return e / (1.0f + e);
}

// y = act(scale·z + shift) + addend for voxel vox (the CPU's order of operations).
__device__ __forceinline__ float rln_train_epi_with(const TrainArgs& a, float z, float scale, float shift, long long vox) {
    float v = z * scale + shift;
    if (a.mode & RLN_EPI_SOFTPLUS) v = rln_softplus(v);
    const int add = (a.mode >> RLN_ADD_SHIFT) & 3;
    if (add == RLN_ADD_CONST) v += a.f[0];
    else if (add == RLN_ADD_SP) v += rln_softplus(a.in[3][vox]);
    return v;
}

// The same with channel c's scale and shift from the parameter block.
__device__ __forceinline__ float rln_train_epi(const TrainArgs& a, float z, int c, long long vox) {
    return rln_train_epi_with(a, z, a.p[0][c], a.p[1][c], vox);
}

// The per-channel parameters p[k][c] of a batch-norm kernel: from device memory when
// wt is set (wt[16·k + c], written on the device by t_bn_fold: nothing of a step's batch
// norm goes through the host, and a captured graph reads this step's values), else from
// the parameter block.
__device__ __forceinline__ float rln_bn_param(const TrainArgs& a, int k, int c) {
    return a.wt ? a.wt[16 * k + c] : a.p[k][c];
}

// Block sum of one f64 value per thread, grouped by channel c = threadIdx.x % C (C a power
// of two ≤ 32 that divides the block size; with a grid-stride loop whose stride is a
// multiple of C, every thread sees one channel only). Thread c < C writes channel c's sum
// to dst[c · stride] when c < limit. Fixed order (shuffle tree, then warps in order):
// deterministic. Every thread of the block must call it; `sred` is 8·32 doubles of shared
// memory.
__device__ __forceinline__ void rln_block_sum_by_channel_at(double v, int C, double* dst, int stride, int limit,
                                                            double* sred) {
    for (int off = 16; off >= C; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane < C) sred[warp * 32 + lane] = v;
    __syncthreads();
    if ((int)threadIdx.x < C) {
        double s = 0.0;
        for (int k = 0; k < RLN_TRAIN_THREADS / 32; ++k) s += sred[k * 32 + threadIdx.x];
        if ((int)threadIdx.x < limit) dst[threadIdx.x * stride] = s;
    }
    __syncthreads();
}

// The same with dst[c] for every c < C.
__device__ __forceinline__ void rln_block_sum_by_channel(double v, int C, double* dst, double* sred) {
    rln_block_sum_by_channel_at(v, C, dst, 1, C, sred);
}

// The block's index in a 3-D grid, x fastest (the row of part[block][·] of the conv epilogue).
__device__ __forceinline__ long long rln_block_linear() {
    return blockIdx.x + (long long)gridDim.x * (blockIdx.y + (long long)gridDim.y * blockIdx.z);
}
