// The one FP32-core tile of the 3×3×3 conv (zero padding 1, stride 1, direct FFMA), used by
// the inference convs (conv_ffma.cuh: fused RL epilogues, f32/f16 storage), the training
// forward convs and data gradients (conv_ffma.cuh: general epilogue, f32) and, for its
// geometry and staging, the weight gradient (conv_wgrad.cuh). The CPU emulation is
// backend::cuda::emulate_tile (keep the two side by side).
//
// Block: output tile TX×TY×TZ = 32×8×4 voxels of one volume, all C_out channels; 256
// threads, each computes VX = 4 consecutive x voxels × C_out channels in registers.
// Grid: (⌈w/TX⌉, ⌈h/TY⌉, n·⌈d/TZ⌉). Shared memory: the folded weights of the whole layer
// [ci][kz][ky][kx][co] (read as broadcasts), then CK input channels of the tile plus a
// one-voxel halo as f32 planes [c][z][y][x] with row stride RS = 38 floats: a thread reads
// its 6 input values of a row as three 8-byte loads; 38 ≡ 2 (mod 4) puts the two rows of a
// half-warp on disjoint banks (conflict-free). Input channels are processed CK at a time.
//
// What the users choose (template parameters):
//   Load  ld(vox, c): channel c of the virtual concatenation at voxel vox, as f32 (inference:
//         RlnArgs, f32 or f16 storage; training: TrainArgs, f32). The data gradient needs no
//         loader of its own: it is this conv over dz with flipped, transposed weights
//         (packed on the host, backend::cuda::train_launch::flip_transpose).
//   Epi   epi.begin() once per thread that has outputs, then epi.voxel(vox, z) with the
//         C_out sums z of each of its voxels inside the volume.
//   KZ_UNROLL  how far the kz loop is unrolled (1 or 3): the one real difference between
//         the users. Inference keeps the full unroll it was measured with on the H200
//         (kernels/NOTES.md); its 1→8 convs run under __launch_bounds__(256, 2) with 95–117
//         registers. Training rolls kz for C_in ≤ 2 (80 registers, where the full unroll
//         spilled under its own bounds). Changing inference to the rolled loop is a
//         performance change to be measured on a GPU, not a refactoring.
#pragma once
#include "rln_common.cuh"

namespace conv3 {
constexpr int TX = 32, TY = 8, TZ = 4, VX = 4;
constexpr int SX = TX + 2, SY = TY + 2, SZ = TZ + 2;
constexpr int RS = 38;            // smem row stride (floats), ≥ SX, ≡ 2 mod 4
constexpr int PS = SY * RS;       // plane stride
constexpr int CS = SZ * PS;       // channel stride (2280 floats = 9120 B, 16-B multiple)
constexpr int NPOS = SZ * SY * SX;
constexpr int THREADS = (TX / VX) * TY * TZ;  // 256
constexpr int TILE = TX * TY * TZ;            // 1024 output voxels
static_assert(THREADS == 256, "one thread per 4 x voxels of a 32×8×4 tile");

// input channels staged per pass: a divisor of C_in, at most 5
// (twins: backend::cuda::launch::ffma_chunk, train_launch::chunk)
__host__ __device__ constexpr int chunk(int cin) { return cin % 4 == 0 ? 4 : (cin % 5 == 0 ? 5 : (cin <= 5 ? cin : 1)); }

// Dynamic shared memory of one forward block (bytes): the weights, rounded up to 16 B, then
// the staged channels. With C_out ∈ {4, 8} (every inference conv) there is nothing to
// round. Twins: launch::ffma_smem_bytes, train_launch::fwd_smem_bytes.
__host__ __device__ constexpr int fwd_smem_bytes(int cin, int cout) { return (((cin * 27 * cout + 3) & ~3) + chunk(cin) * CS) * 4; }
// of one weight-gradient block: the dz tile, then the staged channels (train_launch::wgrad_smem_bytes)
__host__ __device__ constexpr int wgrad_smem_bytes(int cin, int cout) { return (TILE * cout + chunk(cin) * CS) * 4; }
}  // namespace conv3

// Stages channels c0..c0+CK of the tile at (n, z0, y0, x0) of a d×h×w volume with a
// one-voxel halo (zeros outside the volume) as planes [cc][sz][sy][RS]. Channel fastest: a
// warp reads contiguous runs of the channels-last input (a first version walked
// voxel-fastest: 4 B used per 32-B sector).
template <int CK, class Load>
__device__ __forceinline__ void conv3_stage_tile(float* sin, int n, int z0, int y0, int x0, int c0, int d, int h, int w,
                                                 const Load& ld) {
    using namespace conv3;
    for (int i = threadIdx.x; i < CK * NPOS; i += THREADS) {
        const int p = i / CK;
        const int cc = i - p * CK;
        const int sz = p / (SY * SX);
        const int r = p - sz * (SY * SX);
        const int sy = r / SX;
        const int sx = r - sy * SX;
        const int gz = z0 + sz - 1, gy = y0 + sy - 1, gx = x0 + sx - 1;
        float v = 0.0f;
        if (gz >= 0 && gz < d && gy >= 0 && gy < h && gx >= 0 && gx < w) {
            const long long vox = (((long long)n * d + gz) * h + gy) * w + gx;
            v = ld(vox, c0 + cc);
        }
        sin[cc * CS + sz * PS + sy * RS + sx] = v;
    }
}

// The forward tile: block (blockIdx) of the grid above, weights wg [ci][27][co] (global).
template <int CIN, int COUT, int KZ_UNROLL, class Load, class Epi>
__device__ __forceinline__ void conv3_tile(const float* wg, int d, int h, int w, const Load& ld, Epi& epi) {
    using namespace conv3;
    constexpr int CK = chunk(CIN);
    constexpr int NW = CIN * 27 * COUT;
    static_assert(CIN % CK == 0, "chunk must divide C_in");
    static_assert(KZ_UNROLL == 1 || KZ_UNROLL == 3, "kz unroll");
    extern __shared__ float4 rln_smem_f4[];
    float* sw = reinterpret_cast<float*>(rln_smem_f4);
    float* sin = sw + ((NW + 3) & ~3);  // 16-B aligned for the float2 row loads

    const int tid = threadIdx.x;
    const int tx = tid & 7, ty = (tid >> 3) & 7, tz = tid >> 6;
    const int tiles_z = (d + TZ - 1) / TZ;
    const int n = blockIdx.z / tiles_z;
    const int z0 = (blockIdx.z - n * tiles_z) * TZ, y0 = blockIdx.y * TY, x0 = blockIdx.x * TX;

    for (int i = tid; i < NW; i += THREADS) sw[i] = wg[i];

    float acc[COUT][VX];
#pragma unroll
    for (int c = 0; c < COUT; ++c)
#pragma unroll
        for (int v = 0; v < VX; ++v) acc[c][v] = 0.0f;

    for (int c0 = 0; c0 < CIN; c0 += CK) {
        __syncthreads();  // the previous chunk has been consumed
        conv3_stage_tile<CK>(sin, n, z0, y0, x0, c0, d, h, w, ld);
        __syncthreads();
        // one channel per iteration, not unrolled: a fully unrolled pass lets the compiler
        // hoist loads of several channels and spill (seen with C_in = 4)
#pragma unroll 1
        for (int cc = 0; cc < CK; ++cc) {
            const float* wc = sw + (c0 + cc) * 27 * COUT;
            const float* ic = sin + cc * CS + tz * PS + ty * RS + tx * VX;
#pragma unroll(KZ_UNROLL)
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
                        const float* wk = wc + ((kz * 3 + ky) * 3 + kx) * COUT;
                        float wv[COUT];
                        if (COUT % 4 == 0) {  // 16-B broadcasts
#pragma unroll
                            for (int q = 0; q < COUT / 4; ++q) {
                                const float4 t = reinterpret_cast<const float4*>(wk)[q];
                                wv[4 * q] = t.x;
                                wv[4 * q + 1] = t.y;
                                wv[4 * q + 2] = t.z;
                                wv[4 * q + 3] = t.w;
                            }
                        } else {
#pragma unroll
                            for (int c = 0; c < COUT; ++c) wv[c] = wk[c];
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

    // epilogue: the threads with outputs, then epi.end() on every thread (a block
    // reduction of the outputs may follow: TrainConvEpi's batch statistics)
    const int z = z0 + tz, y = y0 + ty;
    if (z < d && y < h) {
        const long long row_vox = (((long long)n * d + z) * h + y) * w;
        epi.begin();
#pragma unroll
        for (int v = 0; v < VX; ++v) {
            const int x = x0 + tx * VX + v;
            if (x < w) {
                float zv[COUT];
#pragma unroll
                for (int c = 0; c < COUT; ++c) zv[c] = acc[c][v];
                epi.voxel(row_vox + x, zv);
            }
        }
    }
    epi.end();
}
