// The two resampling ops of the network: avgpool2 (x → xd) and the 2×2×2 stride-2
// transposed conv (b3 → u, with its folded batch norm and softplus).
#pragma once
#include "rln_common.cuh"

// xd = mean of each 2×2×2 block of x (f32, one channel). args: n, d, h, w = the OUTPUT
// (half) size; in0 = x (2d × 2h × 2w), out = xd. The sum order mirrors backend::cpu.
__device__ __forceinline__ void avgpool2(const RlnArgs& a) {
    const float* x = static_cast<const float*>(a.in0);
    float* o = static_cast<float*>(a.out);
    const long long D = 2LL * a.d, H = 2LL * a.h, W = 2LL * a.w;
    RLN_GRID_STRIDE(i, (long long)a.n * a.d * a.h * a.w) {
        const long long k = i % a.w;
        const long long j = (i / a.w) % a.h;
        const long long z = (i / ((long long)a.w * a.h)) % a.d;
        const long long nn = i / ((long long)a.w * a.h * a.d);
        float acc = 0.0f;
#pragma unroll
        for (int da = 0; da < 2; ++da)
#pragma unroll
            for (int db = 0; db < 2; ++db) {
                const long long r = ((nn * D + 2 * z + da) * H + 2 * j + db) * W + 2 * k;
                acc += x[r] + x[r + 1];
            }
        o[i] = acc * 0.125f;
    }
}

// u[2i+p, 2j+q, 2k+r, o] = sp(Σ_c t[i, j, k, c] · W'[c][o][p][q][r] + bias[o]), W' the
// engine layout [in][out][2][2][2] with the batch-norm scale folded in. args: n, d, h, w =
// the INPUT (half) size; in0 = t (CIN channels, S), out = u (COUT channels, S, 2d×2h×2w).
// One thread per input voxel computes its 8 output voxels.
template <typename S, int CIN, int COUT>
__device__ __forceinline__ void up2_sp(const RlnArgs& a) {
    constexpr bool FAST = sizeof(S) == 2;
    __shared__ float sw[CIN * COUT * 8];
    __shared__ float sb[COUT];
    for (int i = threadIdx.x; i < CIN * COUT * 8; i += blockDim.x) sw[i] = static_cast<const float*>(a.wt)[i];
    if (threadIdx.x < COUT) sb[threadIdx.x] = a.bias[threadIdx.x];
    __syncthreads();
    const S* in = static_cast<const S*>(a.in0);
    const long long H2 = 2LL * a.h, W2 = 2LL * a.w, D2 = 2LL * a.d;
    RLN_GRID_STRIDE(i, (long long)a.n * a.d * a.h * a.w) {
        const long long k = i % a.w;
        const long long j = (i / a.w) % a.h;
        const long long z = (i / ((long long)a.w * a.h)) % a.d;
        const long long nn = i / ((long long)a.w * a.h * a.d);
        float t[CIN];
#pragma unroll
        for (int c = 0; c < CIN; ++c) t[c] = rln_to_f32(in[i * CIN + c]);
        // the 8 output voxels one after the other (unrolled, the compiler keeps all 256
        // weights in registers and spills)
#pragma unroll 1
        for (int pqr = 0; pqr < 8; ++pqr) {
            const int p = pqr >> 2, q = (pqr >> 1) & 1, r = pqr & 1;
            float o[COUT];
#pragma unroll
            for (int co = 0; co < COUT; ++co) {
                float s = 0.0f;
#pragma unroll
                for (int c = 0; c < CIN; ++c) s = fmaf(t[c], sw[(c * COUT + co) * 8 + pqr], s);
                o[co] = rln_sp<FAST>(s + sb[co]);
            }
            const long long ov = ((nn * D2 + 2 * z + p) * H2 + 2 * j + q) * W2 + 2 * k + r;
            rln_store_voxel<S, COUT>(a.out, ov, o);
        }
    }
}
