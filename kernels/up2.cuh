// up2: the 2×2×2 stride-2 transposed conv (rln-spec §3, b3 → u), forward and backward side
// by side. Weights in engine layout W[in][out][p][q][r] (with the batch-norm scale folded
// in for inference). One definition of the index map (up2_child) and of the sum
// (up2_dot), used by:
//   up2_sp          inference (h1_bp_up_*): one thread per half-resolution voxel computes
//                   its 8 children, weights in smem, storage S, fused bias + softplus
//   up2_fwd_train   t_up2_fwd: one thread per full-resolution voxel, general epilogue
//   up2_bwd_data    t_up2_bwd_data: ∂t = Σ_{o,p,q,r} dz[child] · W
//   up2_wgrad       t_up2_wgrad: per-chunk partials of ∂W (reduced by t_reduce_part)
#pragma once
#include "rln_common.cuh"
#include "train_common.cuh"

// The child (2i+p, 2j+q, 2k+r) of half-resolution voxel (nn, i, j, k) in the full-size
// volume of a half-size d × h × w.
__device__ __forceinline__ long long up2_child(long long nn, long long i, long long j, long long k, int p, int q, int r,
                                               int d, int h, int w) {
    const long long D2 = 2LL * d, H2 = 2LL * h, W2 = 2LL * w;
    return ((nn * D2 + 2 * i + p) * H2 + 2 * j + q) * W2 + 2 * k + r;
}

// Σ_c t[c] · W[c][o][pqr] over c < ci, in the CPU's order (t: the parent's ci channels).
template <typename TV, typename WV>
__device__ __forceinline__ float up2_dot(const TV& t, const WV& wt, int ci, int co, int o, int pqr) {
    float s = 0.0f;
    for (int c = 0; c < ci; ++c) s = fmaf(t[c], wt[(c * co + o) * 8 + pqr], s);
    return s;
}

// ---------------------------------------------------------------- inference

// u[2i+p, 2j+q, 2k+r, o] = sp(Σ_c t[i, j, k, c] · W'[c][o][p][q][r] + bias[o]). args: n, d,
// h, w = the INPUT (half) size; in0 = t (CIN channels, S), out = u (COUT channels, S,
// 2d×2h×2w). One thread per input voxel computes its 8 output voxels.
template <typename S, int CIN, int COUT>
__device__ __forceinline__ void up2_sp(const RlnArgs& a) {
    constexpr bool FAST = sizeof(S) == 2;
    __shared__ float sw[CIN * COUT * 8];
    __shared__ float sb[COUT];
    for (int i = threadIdx.x; i < CIN * COUT * 8; i += blockDim.x) sw[i] = static_cast<const float*>(a.wt)[i];
    if (threadIdx.x < COUT) sb[threadIdx.x] = a.bias[threadIdx.x];
    __syncthreads();
    const S* in = static_cast<const S*>(a.in0);
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
            for (int co = 0; co < COUT; ++co) o[co] = rln_sp<FAST>(up2_dot(t, sw, CIN, COUT, co, pqr) + sb[co]);
            rln_store_voxel<S, COUT>(a.out, up2_child(nn, z, j, k, p, q, r, a.d, a.h, a.w), o);
        }
    }
}

// ---------------------------------------------------------------- training
// ca = C_in, cout = C_out (≤ 16); wt = W.

// out[0][2i+p, 2j+q, 2k+r][o] = epi(Σ_in in[0][i, j, k][in] · W[in][o][p][q][r]); n, d, h, w =
// the OUTPUT (full) size; count = output voxels.
__device__ __forceinline__ void up2_fwd_train(const TrainArgs& a) {
    const int CI = a.ca, CO = a.cout;
    const int hd = a.d / 2, hh = a.h / 2, hw = a.w / 2;
    RLN_GRID_STRIDE(ov, a.count) {
        const int ox = (int)(ov % a.w), oy = (int)((ov / a.w) % a.h), oz = (int)((ov / ((long long)a.w * a.h)) % a.d);
        const long long n = ov / ((long long)a.w * a.h * a.d);
        const int pqr = (oz & 1) * 4 + (oy & 1) * 2 + (ox & 1);
        const long long iv = ((n * hd + (oz >> 1)) * hh + (oy >> 1)) * hw + (ox >> 1);
        for (int o = 0; o < CO; ++o) a.out[0][ov * CO + o] = rln_train_epi(a, up2_dot(a.in[0] + iv * CI, a.wt, CI, CO, o, pqr), o, ov);
    }
}

// ∂t[i, j, k][in] = Σ_{o,p,q,r} dz[2i+p, 2j+q, 2k+r][o] · W[in][o][p][q][r]: in[0] = dz
// (cout ch, full size), out[0] = ∂t (ca ch); n, d, h, w = the HALF size; count = half voxels · C_in.
__device__ __forceinline__ void up2_bwd_data(const TrainArgs& a) {
    const int CI = a.ca, CO = a.cout;
    RLN_GRID_STRIDE(e, a.count) {
        const int ci = (int)(e % CI);
        const long long v = e / CI;
        const long long k = v % a.w, j = (v / a.w) % a.h, i = (v / ((long long)a.w * a.h)) % a.d;
        const long long n = v / ((long long)a.w * a.h * a.d);
        float s = 0.0f;
        for (int o = 0; o < CO; ++o)
            for (int p = 0; p < 2; ++p)
                for (int q = 0; q < 2; ++q) {
                    const long long r0 = up2_child(n, i, j, k, p, q, 0, a.d, a.h, a.w);
                    const float* wk = a.wt + ((ci * CO + o) * 2 + p) * 4 + q * 2;
                    s += a.in[0][r0 * CO + o] * wk[0] + a.in[0][(r0 + 1) * CO + o] * wk[1];
                }
        a.out[0][e] = s;
    }
}

// Partial weight gradient over chunks of k0 half-resolution voxels: one thread per
// (chunk, in, pqr) accumulates all C_out weights W[in][o][pqr]; part[chunk][in·CO·8 + o·8 + pqr].
// in[0] = t (ca ch, half size n × d × h × w), in[3] = dz (cout ch, full size); count = chunks · C_in · 8.
__device__ __forceinline__ void up2_wgrad(const TrainArgs& a) {
    const int CI = a.ca, CO = a.cout;
    const long long hv = (long long)a.n * a.d * a.h * a.w;
    RLN_GRID_STRIDE(e, a.count) {
        const int pqr = (int)(e % 8);
        const int ci = (int)((e / 8) % CI);
        const long long ch = e / (8LL * CI);
        const int p = pqr >> 2, q = (pqr >> 1) & 1, r = pqr & 1;
        float acc[16];
#pragma unroll
        for (int o = 0; o < 16; ++o) acc[o] = 0.0f;
        const long long v1 = min(hv, (ch + 1) * a.k0);
        for (long long v = ch * a.k0; v < v1; ++v) {
            const long long k = v % a.w, j = (v / a.w) % a.h, i = (v / ((long long)a.w * a.h)) % a.d;
            const long long n = v / ((long long)a.w * a.h * a.d);
            const float t = a.in[0][v * CI + ci];
            const long long ov = up2_child(n, i, j, k, p, q, r, a.d, a.h, a.w);
#pragma unroll
            for (int o = 0; o < 16; ++o)
                if (o < CO) acc[o] = fmaf(t, a.in[3][ov * CO + o], acc[o]);
        }
        double* dst = a.part + ch * (long long)(CI * CO * 8);
#pragma unroll
        for (int o = 0; o < 16; ++o)
            if (o < CO) dst[(ci * CO + o) * 8 + pqr] = (double)acc[o];
    }
}
