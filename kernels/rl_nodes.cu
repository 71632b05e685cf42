// The Richardson–Lucy nodes of rln-spec.md §3, N×C×D×H×W float tensors:
//   division  q = a / (cm(fp) + eps)     (dv1, dv2 before their batch norm)
//   update    e = a · cm(bp)             (E1r, E2r)
// a and the results have one channel; fp and bp have `channels` channels.
#include "rln_common.cuh"

extern "C" __global__ void rl_divide_f32(const float* __restrict__ a, const float* __restrict__ fp,
                                         float* __restrict__ q, long long batch, long long spatial,
                                         int channels, float eps) {
    RLN_GRID_STRIDE(i, batch * spatial) {
        long long n = i / spatial, v = i - n * spatial;
        const float* f = fp + n * channels * spatial + v;
        float s = 0.0f;
        for (int c = 0; c < channels; ++c) s += f[c * spatial];
        q[i] = a[i] / (s / channels + eps);
    }
}

extern "C" __global__ void rl_update_f32(const float* __restrict__ a, const float* __restrict__ bp,
                                         float* __restrict__ e, long long batch, long long spatial,
                                         int channels) {
    RLN_GRID_STRIDE(i, batch * spatial) {
        long long n = i / spatial, v = i - n * spatial;
        const float* b = bp + n * channels * spatial + v;
        float s = 0.0f;
        for (int c = 0; c < channels; ++c) s += b[c * spatial];
        e[i] = a[i] * (s / channels);
    }
}
