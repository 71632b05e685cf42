// Mixed-precision training convs on the tensor cores (`train --precision mixed`, issue 16
// item 3): mma.sync m16n8k16 with 16-bit operands (S = rln_bf16; rln_h16 would compile
// too) and f32 accumulation, for the wide convs (C_in ∈ {4, 8, 10, 16} as in0 ‖ in1 ‖ in2,
// C_out ∈ {4, 8}). Activations and weights stay f32 in device memory (the FP32 master
// weights are gathered by t_gather as for the FP32 path); both are rounded to S
// (cvt.rn, round to nearest even) once, when a block stages them into shared memory.
//   tmma_fwd_{CA}_{CB}_{CC}_{COUT}_bf16    forward with the general epilogue; with
//       flipped, transposed weights the data gradient (as tconv_fwd)
//   tmma_wgrad_{CA}_{CB}_{CC}_{COUT}_bf16  weight gradient: per-block f64 partials in the
//       engine layout [co][ci][27] for t_reduce_part (as tconv_wgrad)
// The Rust twins: backend::cuda::train_launch::{MMA_VARIANTS, mma_*}; the CPU emulation
// backend::cuda::emulate_train::{tmma_fwd, tmma_wgrad_partials} follows these lines.
//
// One K layout for every C_in (even): k = tap·C_in + c, K = 27·C_in padded to a multiple
// of 16 (NCH chunks; rows k ≥ 27·C_in are zero). C_in even makes the two values of an A
// or B register (k = 2t, 2t + 1) the same tap, adjacent channels: one 32-bit smem load.
// Tile: 16×8×8 output voxels (x, y, z), 8 warps; staged input 18×10×10 voxels × C_in
// halves, channels-last (zeros outside the volume).
//   forward: warp w owns output plane z = w; per row y a chain of NCH mma (M = the 16 x
//            voxels, N = 8 output channels, K chunk by chunk), then the epilogue from
//            the accumulators: (c0, c1) voxel x = g, channels 2t, 2t+1; (c2, c3) x = g+8.
//            B fragments (weights, [chunk][lane] uint2) are staged once per block.
//   wgrad:   D[m][n] = Σ_v in[v + tap(m)][c(m)] · dz[v][n]: M = 16 (tap, c) rows of the
//            K layout above (chunk mc), N = 8 output channels, K = 16 voxels of one row.
//            Warp w owns chunks w, w + 8, …; per tile an f32 chain of 64 mma (8 planes ×
//            8 rows), added to f64 accumulators; the block walks tiles t = blockIdx.x +
//            k·gridDim.x and writes its partial of every weight (each by one lane).
#pragma once
#include "conv3_mma.cuh"
#include "train_common.cuh"

namespace tmma {
constexpr int TX = 16, TY = 8, TZ = 8;
constexpr int SX = TX + 2, SY = TY + 2, SZ = TZ + 2;
constexpr int NVOX = SX * SY * SZ;  // 1800
constexpr int TILE = TX * TY * TZ;  // 1024
constexpr int THREADS = 256, WARPS = THREADS / 32;
static_assert(WARPS == TZ, "one warp per output plane (forward)");
// backend::cuda::train_launch::{mma_chunks, mma_fwd_smem_bytes, mma_wgrad_smem_bytes} are the twins
__host__ __device__ constexpr int chunks(int cin) { return (27 * cin + 15) / 16; }
__host__ __device__ constexpr int fwd_smem_bytes(int cin) { return NVOX * cin * 2 + chunks(cin) * 32 * 8; }
__host__ __device__ constexpr int wgrad_smem_bytes(int cin) { return NVOX * cin * 2 + TILE * 8 * 2; }
}  // namespace tmma

// Concatenated input channel c of voxel vox (f32).
template <int CA, int CB, int CC>
__device__ __forceinline__ float tmma_in(const TrainArgs& a, long long vox, int c) {
    if (c < CA) return a.in[0][vox * CA + c];
    if (CB > 0 && c < CA + CB) return a.in[1][vox * CB + (c - CA)];
    return a.in[2][vox * CC + (c - CA - CB)];
}

// The 16-bit bits of v (round to nearest even).
template <typename S> __device__ __forceinline__ rln_h16 tmma_bits(float v);
template <> __device__ __forceinline__ rln_h16 tmma_bits<rln_bf16>(float v) { return rln_f2bf(v); }
template <> __device__ __forceinline__ rln_h16 tmma_bits<rln_h16>(float v) { return rln_f2h(v); }

// Stages the input tile with its halo (origin z0-1, y0-1, x0-1 of batch item n),
// channel-fastest (a warp reads contiguous channels-last runs), rounded to S.
template <typename S, int CA, int CB, int CC>
__device__ __forceinline__ void tmma_stage_in(const TrainArgs& a, rln_h16* sin, int n, int z0, int y0, int x0) {
    constexpr int CIN = CA + CB + CC;
    for (int i = threadIdx.x; i < tmma::NVOX * CIN; i += tmma::THREADS) {
        const int v = i / CIN, c = i - v * CIN;
        const int sx = v % tmma::SX, sy = (v / tmma::SX) % tmma::SY, sz = v / (tmma::SX * tmma::SY);
        const int gz = z0 + sz - 1, gy = y0 + sy - 1, gx = x0 + sx - 1;
        float val = 0.0f;
        if (gz >= 0 && gz < a.d && gy >= 0 && gy < a.h && gx >= 0 && gx < a.w)
            val = tmma_in<CA, CB, CC>(a, (((long long)n * a.d + gz) * a.h + gy) * a.w + gx, c);
        sin[i] = tmma_bits<S>(val);
    }
}

// Staged voxel of output-relative position (lz, ly, lx) shifted by tap.
__device__ __forceinline__ int tmma_voxel(int lz, int ly, int lx, int tap) {
    return ((lz + tap / 9) * tmma::SY + ly + (tap / 3) % 3) * tmma::SX + lx + tap % 3;
}

template <typename S, int CA, int CB, int CC, int COUT>
__device__ __forceinline__ void tmma_fwd(const TrainArgs& a) {
    constexpr int CIN = CA + CB + CC;
    constexpr int NCH = tmma::chunks(CIN);
    constexpr int KR = 27 * CIN;
    static_assert(CIN % 2 == 0 && COUT <= 8, "mma training conv: even C_in, C_out ≤ 8");
    extern __shared__ float4 rln_smem_f4[];
    rln_h16* sin = reinterpret_cast<rln_h16*>(rln_smem_f4);                 // [NVOX][CIN]
    uint2* sb = reinterpret_cast<uint2*>(sin + tmma::NVOX * CIN);           // [NCH][32]
    const int tiles_z = (a.d + tmma::TZ - 1) / tmma::TZ;
    const int n = blockIdx.z / tiles_z;
    const int z0 = (blockIdx.z - n * tiles_z) * tmma::TZ, y0 = blockIdx.y * tmma::TY, x0 = blockIdx.x * tmma::TX;
    // B fragments: b0 rows k = 2t, 2t+1, b1 rows 2t+8, 2t+9 of chunk ch, column n = g
    for (int i = threadIdx.x; i < NCH * 32; i += tmma::THREADS) {
        const int ch = i / 32, lane = i % 32, g = lane >> 2, t = lane & 3;
        float w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int k = ch * 16 + 2 * t + (j & 1) + 8 * (j >> 1);
            w[j] = 0.0f;
            if (k < KR && g < COUT) w[j] = a.wt[((k % CIN) * 27 + k / CIN) * COUT + g];
        }
        sb[i] = make_uint2((rln_u32)tmma_bits<S>(w[0]) | ((rln_u32)tmma_bits<S>(w[1]) << 16),
                           (rln_u32)tmma_bits<S>(w[2]) | ((rln_u32)tmma_bits<S>(w[3]) << 16));
    }
    tmma_stage_in<S, CA, CB, CC>(a, sin, n, z0, y0, x0);
    __syncthreads();

    const int lane = threadIdx.x & 31, lz = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int gz = z0 + lz;
    const rln_u32* sin32 = reinterpret_cast<const rln_u32*>(sin);
    // batch statistics (RLN_EPI_STATS): this thread's channels 2t, 2t+1, as TrainConvEpi
    double s1[2] = {0.0, 0.0}, s2[2] = {0.0, 0.0};
    for (int ly = 0; ly < tmma::TY; ++ly) {
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int ch = 0; ch < NCH; ++ch) {
            rln_u32 ar[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int m = g + 8 * (i & 1), k = ch * 16 + 2 * t + 8 * (i >> 1);
                ar[i] = 0u;
                if (k < KR) ar[i] = sin32[(tmma_voxel(lz, ly, m, k / CIN) * CIN + k % CIN) >> 1];
            }
            const uint2 b = sb[ch * 32 + lane];
            rln_mma_16816<S>(c, ar[0], ar[1], ar[2], ar[3], b.x, b.y);
        }
        const int gy = y0 + ly;
        if (gz >= a.d || gy >= a.h) continue;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int gx = x0 + g + 8 * (i >> 1), co = 2 * t + (i & 1);
            if (co < COUT && gx < a.w) {
                const long long vox = (((long long)n * a.d + gz) * a.h + gy) * a.w + gx;
                const float y = rln_train_epi(a, c[i], co, vox);
                a.out[0][vox * COUT + co] = y;
                s1[i & 1] += (double)y;
                s2[i & 1] += (double)y * (double)y;
            }
        }
    }
    if (a.mode & RLN_EPI_STATS) {  // uniform over the block; every thread is here
        __shared__ double sred[8 * 32];
        double* dst = a.part + rln_block_linear() * 2 * COUT;
        // lanes with the same t (threadIdx.x % 4) hold channel 2t + j: thread t < 4 writes it
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            rln_block_sum_by_channel_at(s1[j], 4, dst + j, 2, (COUT - j + 1) / 2, sred);
            rln_block_sum_by_channel_at(s2[j], 4, dst + COUT + j, 2, (COUT - j + 1) / 2, sred);
        }
    }
}

template <typename S, int CA, int CB, int CC, int COUT>
__device__ __forceinline__ void tmma_wgrad(const TrainArgs& a) {
    constexpr int CIN = CA + CB + CC;
    constexpr int NCH = tmma::chunks(CIN);
    constexpr int KR = 27 * CIN;
    constexpr int NW = COUT * CIN * 27;
    constexpr int MPW = (NCH + tmma::WARPS - 1) / tmma::WARPS;  // chunks per warp
    static_assert(CIN % 2 == 0 && COUT <= 8, "mma training conv: even C_in, C_out ≤ 8");
    extern __shared__ float4 rln_smem_f4[];
    rln_h16* sin = reinterpret_cast<rln_h16*>(rln_smem_f4);  // [NVOX][CIN]
    rln_h16* sdz = sin + tmma::NVOX * CIN;                    // [TILE][8]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int tiles_x = (a.w + tmma::TX - 1) / tmma::TX, tiles_y = (a.h + tmma::TY - 1) / tmma::TY,
              tiles_z = (a.d + tmma::TZ - 1) / tmma::TZ;
    const int ntiles = tiles_x * tiles_y * tiles_z * a.n;
    const float* dz = a.in[3];

    double acc64[MPW][4];
#pragma unroll
    for (int j = 0; j < MPW; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc64[j][i] = 0.0;

    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int bx = tile % tiles_x, by = (tile / tiles_x) % tiles_y, bzn = tile / (tiles_x * tiles_y);
        const int n = bzn / tiles_z;
        const int z0 = (bzn - n * tiles_z) * tmma::TZ, y0 = by * tmma::TY, x0 = bx * tmma::TX;
        __syncthreads();  // the previous tile has been consumed
        tmma_stage_in<S, CA, CB, CC>(a, sin, n, z0, y0, x0);
        for (int i = threadIdx.x; i < tmma::TILE * 8; i += tmma::THREADS) {
            const int p = i >> 3, co = i & 7;
            const int lx = p % tmma::TX, ly = (p / tmma::TX) % tmma::TY, lz = p / (tmma::TX * tmma::TY);
            const int gz = z0 + lz, gy = y0 + ly, gx = x0 + lx;
            float v = 0.0f;
            if (co < COUT && gz < a.d && gy < a.h && gx < a.w)
                v = dz[((((long long)n * a.d + gz) * a.h + gy) * a.w + gx) * COUT + co];
            sdz[i] = tmma_bits<S>(v);
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < MPW; ++j) {
            const int mc = warp + tmma::WARPS * j;
            if (mc >= NCH) break;
            float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int lz = 0; lz < tmma::TZ; ++lz) {
                for (int ly = 0; ly < tmma::TY; ++ly) {
                    rln_u32 ar[4], br[2];
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const int m = mc * 16 + g + 8 * (i & 1), x = 2 * t + 8 * (i >> 1);
                        ar[i] = 0u;
                        if (m < KR) {
                            const int v = tmma_voxel(lz, ly, x, m / CIN), cc = m % CIN;
                            ar[i] = (rln_u32)sin[v * CIN + cc] | ((rln_u32)sin[(v + 1) * CIN + cc] << 16);
                        }
                    }
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        const int p = (lz * tmma::TY + ly) * tmma::TX + 2 * t + 8 * i;
                        br[i] = (rln_u32)sdz[p * 8 + g] | ((rln_u32)sdz[(p + 1) * 8 + g] << 16);
                    }
                    rln_mma_16816<S>(c, ar[0], ar[1], ar[2], ar[3], br[0], br[1]);
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) acc64[j][i] += (double)c[i];
        }
    }
#pragma unroll
    for (int j = 0; j < MPW; ++j) {
        const int mc = warp + tmma::WARPS * j;
        if (mc >= NCH) break;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = mc * 16 + g + 8 * (i >> 1), co = 2 * t + (i & 1);
            if (m < KR && co < COUT) a.part[(long long)blockIdx.x * NW + (co * CIN + m % CIN) * 27 + m / CIN] = acc64[j][i];
        }
    }
}

#define RLN_TMMA(CA, CB, CC, COUT)                                                                        \
    extern "C" __global__ void __launch_bounds__(256, 2) tmma_fwd_##CA##_##CB##_##CC##_##COUT##_bf16(   \
        const TrainArgs a) {                                                                              \
        tmma_fwd<rln_bf16, CA, CB, CC, COUT>(a);                                                          \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256, 2) tmma_wgrad_##CA##_##CB##_##CC##_##COUT##_bf16( \
        const TrainArgs a) {                                                                              \
        tmma_wgrad<rln_bf16, CA, CB, CC, COUT>(a);                                                        \
    }
