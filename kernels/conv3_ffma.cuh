// 3×3×3 conv (zero padding 1, stride 1) over the virtual concatenation in0 ‖ in1 ‖ in2,
// with the batch norm folded into the weights and bias, and a fused epilogue: the direct
// convolution on the FP32 cores. Used for every layer of the f32 network and for the
// small layers (C_in ≤ 4, C_out = 4) of the f16 network.
//
// Block: output tile TX×TY×TZ = 32×8×4 voxels of one volume, all C_out channels; 256
// threads, each computes VX = 4 consecutive x voxels × C_out channels in registers.
// Shared memory: the folded weights of the whole layer [ci][kz][ky][kx][co] (read as
// broadcasts), then CK input channels of the tile plus a one-voxel halo as f32 planes
// [c][z][y][x] with row stride RS = 38 floats: a thread reads its 6 input values of a
// row as three 8-byte loads; 38 ≡ 2 (mod 4) puts the two rows of a half-warp on
// disjoint banks (conflict-free). Input channels are processed CK at a time.
#pragma once
#include "rln_common.cuh"

namespace ffmac {
constexpr int TX = 32, TY = 8, TZ = 4, VX = 4;
constexpr int SX = TX + 2, SY = TY + 2, SZ = TZ + 2;
constexpr int RS = 38;            // smem row stride (floats), ≥ SX, ≡ 2 mod 4
constexpr int PS = SY * RS;       // plane stride
constexpr int CS = SZ * PS;       // channel stride (2280 floats = 9120 B, 16-B multiple)
constexpr int NPOS = SZ * SY * SX;
constexpr int THREADS = (TX / VX) * TY * TZ;  // 256
static_assert(THREADS == 256, "ffma tile");

// input channels staged per pass: a divisor of C_in, at most 5
__host__ __device__ constexpr int chunk(int cin) { return cin % 4 == 0 ? 4 : (cin % 5 == 0 ? 5 : (cin <= 5 ? cin : 1)); }

// dynamic shared memory of one block (bytes); backend::cuda::launch::ffma_smem_bytes is its twin
__host__ __device__ constexpr int smem_bytes(int cin, int cout) { return (cin * 27 * cout + chunk(cin) * CS) * 4; }
}  // namespace ffmac

template <typename S, int CA, int CB, int CC, int COUT, int EPI>
__device__ __forceinline__ void conv3_ffma(const RlnArgs& a) {
    using namespace ffmac;
    constexpr int CIN = CA + CB + CC;
    constexpr int CK = chunk(CIN);
    constexpr int NW = CIN * 27 * COUT;
    static_assert(CIN % CK == 0, "chunk must divide C_in");
    static_assert(COUT == 4 || COUT == 8, "C_out is 4 or 8");
    extern __shared__ float4 rln_smem_f4[];
    float* sw = reinterpret_cast<float*>(rln_smem_f4);
    float* sin = sw + NW;  // NW·4 bytes is a multiple of 16 (COUT ∈ {4, 8})

    const int tid = threadIdx.x;
    const int tx = tid & 7, ty = (tid >> 3) & 7, tz = tid >> 6;
    const int tiles_z = (a.d + TZ - 1) / TZ;
    const int n = blockIdx.z / tiles_z;
    const int z0 = (blockIdx.z - n * tiles_z) * TZ, y0 = blockIdx.y * TY, x0 = blockIdx.x * TX;

    const float* wg = static_cast<const float*>(a.wt);
    for (int i = tid; i < NW; i += THREADS) sw[i] = wg[i];

    float acc[COUT][VX];
#pragma unroll
    for (int c = 0; c < COUT; ++c)
#pragma unroll
        for (int v = 0; v < VX; ++v) acc[c][v] = 0.0f;

    for (int c0 = 0; c0 < CIN; c0 += CK) {
        __syncthreads();  // the previous chunk has been consumed
        // channel fastest: a warp reads whole runs of each voxel's channels (channels-last),
        // not one channel of 32 voxels (a 4-B use of every 32-B sector)
        for (int i = tid; i < CK * NPOS; i += THREADS) {
            const int p = i / CK;
            const int cc = i - p * CK;
            const int sz = p / (SY * SX);
            const int r = p - sz * (SY * SX);
            const int sy = r / SX;
            const int sx = r - sy * SX;
            const int gz = z0 + sz - 1, gy = y0 + sy - 1, gx = x0 + sx - 1;
            float v = 0.0f;
            if (gz >= 0 && gz < a.d && gy >= 0 && gy < a.h && gx >= 0 && gx < a.w) {
                const long long vox = (((long long)n * a.d + gz) * a.h + gy) * a.w + gx;
                v = rln_load_concat<S, CA, CB, CC>(a, vox, c0 + cc);
            }
            sin[cc * CS + sz * PS + sy * RS + sx] = v;
        }
        __syncthreads();
        // one channel per iteration, not unrolled: a fully unrolled pass lets the compiler
        // hoist loads of several channels and spill (seen with C_in = 4)
#pragma unroll 1
        for (int cc = 0; cc < CK; ++cc) {
            const float* wc = sw + (c0 + cc) * 27 * COUT;
            const float* ic = sin + cc * CS + tz * PS + ty * RS + tx * VX;
#pragma unroll
            for (int kz = 0; kz < 3; ++kz) {
#pragma unroll
                for (int ky = 0; ky < 3; ++ky) {
                    const float* row = ic + kz * PS + ky * RS;
                    const float2 r0 = *reinterpret_cast<const float2*>(row);
                    const float2 r1 = *reinterpret_cast<const float2*>(row + 2);
                    const float2 r2 = *reinterpret_cast<const float2*>(row + 4);
                    const float in[VX + 2] = {r0.x, r0.y, r1.x, r1.y, r2.x, r2.y};
#pragma unroll
                    for (int kx = 0; kx < 3; ++kx) {
                        const float4* wk = reinterpret_cast<const float4*>(wc + ((kz * 3 + ky) * 3 + kx) * COUT);
                        float wv[COUT];
#pragma unroll
                        for (int q = 0; q < COUT / 4; ++q) {
                            const float4 t = wk[q];
                            wv[4 * q] = t.x;
                            wv[4 * q + 1] = t.y;
                            wv[4 * q + 2] = t.z;
                            wv[4 * q + 3] = t.w;
                        }
#pragma unroll
                        for (int c = 0; c < COUT; ++c)
#pragma unroll
                            for (int v = 0; v < VX; ++v) acc[c][v] = fmaf(wv[c], in[v + kx], acc[c][v]);
                    }
                }
            }
        }
    }

    // epilogue: every thread still here (no barrier follows)
    const int z = z0 + tz, y = y0 + ty;
    if (z >= a.d || y >= a.h) return;
    const long long row_vox = (((long long)n * a.d + z) * a.h + y) * a.w;
    float bias[COUT];
#pragma unroll
    for (int c = 0; c < COUT; ++c) bias[c] = a.bias[c];
#pragma unroll
    for (int v = 0; v < VX; ++v) {
        const int x = x0 + tx * VX + v;
        if (x < a.w) {
            float zv[COUT];
#pragma unroll
            for (int c = 0; c < COUT; ++c) zv[c] = acc[c][v] + bias[c];
            rln_epilogue_voxel<EPI, S, COUT>(a, row_vox + x, zv);
        }
    }
}

// 3 blocks per SM (registers capped at 80) except for the 1→8 convs, which spill a few
// words under that cap and get 2 (their work per block is small).
#define RLN_FFMA_MIN_BLOCKS(CIN, COUT) ((CIN) == 1 && (COUT) == 8 ? 2 : 3)
#define RLN_CONV_FFMA(name, S, CA, CB, CC, COUT, EPI)                                              \
    extern "C" __global__ void __launch_bounds__(ffmac::THREADS, RLN_FFMA_MIN_BLOCKS(CA + CB + CC, COUT)) \
        name(const RlnArgs a) {                                                                    \
        conv3_ffma<S, CA, CB, CC, COUT, EPI>(a);                                                   \
    }
