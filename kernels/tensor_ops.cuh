// Tensor plumbing of training (TrainArgs): gradient accumulation, shape changes (pad, crop,
// uncrop) and the fixed-order reduction of per-block partial sums that every reduction
// kernel ends with (deterministic: the grid depends only on the element count).
#pragma once
#include "train_common.cuh"

// out[0] += in[0]
__device__ __forceinline__ void tensor_accumulate(const TrainArgs& a) {
    RLN_GRID_STRIDE(e, a.count) { a.out[0][e] += a.in[0][e]; }
}

// out[0][j] = in[0][idx[j]] for j < count, idx = (const int*)wt: a weight layout (packed
// forward, flipped-transposed data gradient) gathered from the master weights on the
// device, so the convs of a resident step read this step's weights without the host.
__device__ __forceinline__ void tensor_gather(const TrainArgs& a) {
    const int* idx = reinterpret_cast<const int*>(a.wt);
    RLN_GRID_STRIDE(j, a.count) { a.out[0][j] = a.in[0][idx[j]]; }
}

__device__ __forceinline__ int rln_mirror(int i, int n) { return i < n ? i : 2 * n - 1 - i; }

// Shape changes: out[0] is n × d × h × w × C (ca channels), in[0] is n × k0 × k1 × k2 × C.
// mode 0: mirror pad (symmetric, edge repeated), 1: crop (leading corner), 2: uncrop (zeros
// outside the source).
__device__ __forceinline__ void tensor_reshape(const TrainArgs& a) {
    const int C = a.ca;
    RLN_GRID_STRIDE(e, a.count) {
        const int c = (int)(e % C);
        const long long v = e / C;
        const int x = (int)(v % a.w), y = (int)((v / a.w) % a.h), z = (int)((v / ((long long)a.w * a.h)) % a.d);
        const long long n = v / ((long long)a.w * a.h * a.d);
        int sz = z, sy = y, sx = x;
        if (a.mode == 0) {
            sz = rln_mirror(z, a.k0);
            sy = rln_mirror(y, a.k1);
            sx = rln_mirror(x, a.k2);
        } else if (a.mode == 2 && (z >= a.k0 || y >= a.k1 || x >= a.k2)) {
            a.out[0][e] = 0.0f;
            continue;
        }
        a.out[0][e] = a.in[0][(((n * a.k0 + sz) * a.k1 + sy) * a.k2 + sx) * C + c];
    }
}

// stat[j] = dc[0] · Σ_b part[b][j] for j < k0 (J), b < k1 (blocks): one block per j,
// threads take b = tid, tid + 256, …, then a fixed tree.
__device__ __forceinline__ void reduce_part(const TrainArgs& a) {
    __shared__ double sred[256];
    const int j = blockIdx.x;
    const int J = a.k0, nb = a.k1;
    double s = 0.0;
    for (int b = threadIdx.x; b < nb; b += 256) s += a.part[(long long)b * J + j];
    sred[threadIdx.x] = s;
    __syncthreads();
    for (int off = 128; off > 0; off >>= 1) {
        if ((int)threadIdx.x < off) sred[threadIdx.x] += sred[threadIdx.x + off];
        __syncthreads();
    }
    if (threadIdx.x == 0) a.stat[j] = sred[0] * a.dc[0];
}
