// avgpool2: the mean of each 2×2×2 block (rln-spec §3, x → xd), for inference (RlnArgs,
// one channel) and training (TrainArgs, C channels): one implementation, avgpool2_at. The
// network needs no backward (its input x is data, not a parameter's function).
#pragma once
#include "rln_common.cuh"
#include "train_common.cuh"

// Element e (= voxel·C + c) of the pooled channels-last tensor (n × d × h × w × C, the HALF
// size) from x (2d × 2h × 2w × C). The sum order mirrors backend::cpu.
__device__ __forceinline__ float avgpool2_at(const float* x, long long e, int C, int d, int h, int w) {
    const int c = (int)(e % C);
    const long long v = e / C;
    const long long k = v % w, j = (v / w) % h, z = (v / ((long long)w * h)) % d;
    const long long n = v / ((long long)w * h * d);
    const long long D = 2LL * d, H = 2LL * h, W = 2LL * w;
    float acc = 0.0f;
#pragma unroll
    for (int da = 0; da < 2; ++da)
#pragma unroll
        for (int db = 0; db < 2; ++db) {
            const long long r = ((n * D + 2 * z + da) * H + 2 * j + db) * W + 2 * k;
            acc += x[r * C + c] + x[(r + 1) * C + c];
        }
    return acc * 0.125f;
}

// Inference (avgpool2_f32): n, d, h, w = the OUTPUT (half) size; in0 = x (one channel), out = xd.
__device__ __forceinline__ void avgpool2(const RlnArgs& a) {
    const float* x = static_cast<const float*>(a.in0);
    float* o = static_cast<float*>(a.out);
    RLN_GRID_STRIDE(i, (long long)a.n * a.d * a.h * a.w) { o[i] = avgpool2_at(x, i, 1, a.d, a.h, a.w); }
}

// Training (t_avgpool2): out[0] = the pooled in[0] (ca = C channels); n, d, h, w = the half
// size; count = elements of out[0].
__device__ __forceinline__ void avgpool2_train(const TrainArgs& a) {
    RLN_GRID_STRIDE(e, a.count) { a.out[0][e] = avgpool2_at(a.in[0], e, a.ca, a.d, a.h, a.w); }
}
