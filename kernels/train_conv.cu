// The 3×3×3 conv (zero padding 1, stride 1, no bias) of training, f32, channels-last:
//   tconv_fwd_*    forward over the virtual concatenation in[0] ‖ in[1] ‖ in[2], with the
//                  general epilogue (scale, shift, softplus, addend); with flipped,
//                  transposed weights (packed on the host) it is also the data gradient
//   tconv_wgrad_*  the weight gradient: per-block partial sums (f32 in registers, f64 across
//                  thread groups), reduced over blocks in a fixed order by t_reduce_part
//   *_any          the same with run-time channel counts (any C_in, C_out ≤ 16): slow, for
//                  shapes without a specialized kernel
// Kernel names: tconv_fwd_{CA}_{CB}_{CC}_{COUT}; the host table is
// backend::cuda::train_launch::{FWD_VARIANTS, WGRAD_VARIANTS}.
#include "train_common.cuh"

namespace tconv {
constexpr int TX = 32, TY = 8, TZ = 4, VX = 4;
constexpr int SX = TX + 2, SY = TY + 2, SZ = TZ + 2;
constexpr int RS = 38;        // smem row stride (floats), ≡ 2 mod 4 as in conv3_ffma.cuh
constexpr int PS = SY * RS;   // plane stride
constexpr int CS = SZ * PS;   // channel stride (2280 floats)
constexpr int NPOS = SZ * SY * SX;
constexpr int THREADS = RLN_TRAIN_THREADS;
constexpr int TILE = TX * TY * TZ;  // 1024 output voxels
static_assert((TX / VX) * TY * TZ == THREADS, "one thread per 4 x voxels");

// input channels staged per pass: a divisor of C_in, at most 5 (twin: train_launch::chunk)
__host__ __device__ constexpr int chunk(int cin) { return cin % 4 == 0 ? 4 : (cin % 5 == 0 ? 5 : (cin <= 5 ? cin : 1)); }
// dynamic shared memory (bytes); twins: train_launch::{fwd_smem_bytes, wgrad_smem_bytes}
__host__ __device__ constexpr int fwd_smem_bytes(int cin, int cout) { return (((cin * 27 * cout + 3) & ~3) + chunk(cin) * CS) * 4; }
__host__ __device__ constexpr int wgrad_smem_bytes(int cin, int cout) { return (TILE * cout + chunk(cin) * CS) * 4; }

// Channel c of the concatenation at voxel vox.
template <int CA, int CB, int CC>
__device__ __forceinline__ float load_concat(const TrainArgs& a, long long vox, int c) {
    if (c < CA) return a.in[0][vox * CA + c];
    if (CB > 0 && c < CA + CB) return a.in[1][vox * CB + (c - CA)];
    if (CC > 0) return a.in[2][vox * CC + (c - CA - CB)];
    return 0.0f;
}

// Stages channels c0..c0+CK of the tile at (n, z0, y0, x0) with a one-voxel halo (zeros
// outside the volume) as planes [cc][sz][sy][RS]. Channel fastest: a warp reads runs of
// each voxel's channels.
template <int CA, int CB, int CC, int CK>
__device__ __forceinline__ void stage_tile(const TrainArgs& a, float* sin, int n, int z0, int y0, int x0, int c0) {
    for (int i = threadIdx.x; i < CK * NPOS; i += THREADS) {
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
            v = load_concat<CA, CB, CC>(a, vox, c0 + cc);
        }
        sin[cc * CS + sz * PS + sy * RS + sx] = v;
    }
}
}  // namespace tconv

// ---------------------------------------------------------------- forward / data gradient

// Block: 32×8×4 output voxels × all C_out; thread: 4 consecutive x voxels × C_out.
// wt: [ci][kz][ky][kx][co] (train_launch::pack_fwd). out[0]: C_out channels.
template <int CA, int CB, int CC, int COUT>
__device__ __forceinline__ void tconv_fwd(const TrainArgs& a) {
    using namespace tconv;
    constexpr int CIN = CA + CB + CC;
    constexpr int CK = chunk(CIN);
    constexpr int NW = CIN * 27 * COUT;
    static_assert(CIN % CK == 0, "chunk divides C_in");
    extern __shared__ float4 rln_smem_f4[];
    float* sw = reinterpret_cast<float*>(rln_smem_f4);
    // NW·4 bytes is a multiple of 16 when COUT % 4 == 0; else round up
    float* sin = sw + ((NW + 3) & ~3);

    const int tid = threadIdx.x;
    const int tx = tid & 7, ty = (tid >> 3) & 7, tz = tid >> 6;
    const int tiles_z = (a.d + TZ - 1) / TZ;
    const int n = blockIdx.z / tiles_z;
    const int z0 = (blockIdx.z - n * tiles_z) * TZ, y0 = blockIdx.y * TY, x0 = blockIdx.x * TX;
    for (int i = tid; i < NW; i += THREADS) sw[i] = a.wt[i];

    float acc[COUT][VX];
#pragma unroll
    for (int c = 0; c < COUT; ++c)
#pragma unroll
        for (int v = 0; v < VX; ++v) acc[c][v] = 0.0f;

    for (int c0 = 0; c0 < CIN; c0 += CK) {
        __syncthreads();  // the previous chunk has been consumed
        stage_tile<CA, CB, CC, CK>(a, sin, n, z0, y0, x0, c0);
        __syncthreads();
#pragma unroll 1
        for (int cc = 0; cc < CK; ++cc) {
            const float* wc = sw + (c0 + cc) * 27 * COUT;
            const float* ic = sin + cc * CS + tz * PS + ty * RS + tx * VX;
            // one input channel: a fully unrolled pass hoists all 27·C_out weight loads and
            // spills (seen with 1→8); rolling kz keeps 9·C_out live
#pragma unroll(CIN <= 2 ? 1 : 3)
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
                        if (COUT % 4 == 0) {
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

    const int z = z0 + tz, y = y0 + ty;
    if (z >= a.d || y >= a.h) return;
    const long long row_vox = (((long long)n * a.d + z) * a.h + y) * a.w;
#pragma unroll
    for (int v = 0; v < VX; ++v) {
        const int x = x0 + tx * VX + v;
        if (x < a.w) {
            const long long vox = row_vox + x;
            float o[COUT];
#pragma unroll
            for (int c = 0; c < COUT; ++c) o[c] = rln_train_epi(a, acc[c][v], c, vox);
            if (COUT % 4 == 0) {
                float4* dst = reinterpret_cast<float4*>(a.out[0] + vox * COUT);
#pragma unroll
                for (int q = 0; q < COUT / 4; ++q) dst[q] = make_float4(o[4 * q], o[4 * q + 1], o[4 * q + 2], o[4 * q + 3]);
            } else {
#pragma unroll
                for (int c = 0; c < COUT; ++c) a.out[0][vox * COUT + c] = o[c];
            }
        }
    }
}

// ---------------------------------------------------------------- weight gradient

// dW[co][ci][kz][ky][kx] = Σ_voxels dz[v][co] · in[v + (kz-1, ky-1, kx-1)][ci].
// Grid: x = blocks walking the 32×8×4 tiles (tile t = blockIdx.x + k·gridDim.x), y = input
// channel chunks of CK. Thread = (column, group): a column is (cc, kz, ky) of the chunk and
// holds 3 (kx) × C_out accumulators; the G groups split the tile's 32 rows. Per x step a
// thread loads one input value (sliding window over kx) and C_out dz values (16-B
// broadcasts) for 3·C_out FMA. At the end the groups are summed in a fixed order (f64) and
// the block writes its partial of the chunk's weights to part[blockIdx.x][NW].
template <int CA, int CB, int CC, int COUT>
__device__ __forceinline__ void tconv_wgrad(const TrainArgs& a) {
    using namespace tconv;
    constexpr int CIN = CA + CB + CC;
    constexpr int CK = chunk(CIN);
    constexpr int NCOL = CK * 9;
    constexpr int G = THREADS / NCOL;
    constexpr int NW = COUT * CIN * 27;
    constexpr int ROWS = TY * TZ;
    static_assert(G >= 1 && 3 * COUT * THREADS <= TILE * COUT, "reduction scratch fits the dz tile");
    extern __shared__ float4 rln_smem_f4[];
    float* sdz = reinterpret_cast<float*>(rln_smem_f4);  // [TILE][COUT]
    float* sin = sdz + TILE * COUT;                       // [CK][SZ][SY][RS]

    const int tid = threadIdx.x;
    const int col = tid % NCOL, g = tid / NCOL;
    const int cc = col / 9, kz = (col % 9) / 3, ky = col % 3;
    const int c0 = blockIdx.y * CK;
    const int tiles_x = (a.w + TX - 1) / TX, tiles_y = (a.h + TY - 1) / TY, tiles_z = (a.d + TZ - 1) / TZ;
    const int ntiles = tiles_x * tiles_y * tiles_z * a.n;
    const float* dz = a.in[3];

    float acc[3][COUT];
#pragma unroll
    for (int k = 0; k < 3; ++k)
#pragma unroll
        for (int c = 0; c < COUT; ++c) acc[k][c] = 0.0f;

    for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
        const int bx = t % tiles_x;
        const int by = (t / tiles_x) % tiles_y;
        const int bzn = t / (tiles_x * tiles_y);
        const int n = bzn / tiles_z;
        const int z0 = (bzn - n * tiles_z) * TZ, y0 = by * TY, x0 = bx * TX;
        __syncthreads();  // the previous tile has been consumed
        for (int i = tid; i < TILE * COUT; i += THREADS) {
            const int p = i / COUT;
            const int c = i - p * COUT;
            const int lx = p % TX, ly = (p / TX) % TY, lz = p / (TX * TY);
            const int gz = z0 + lz, gy = y0 + ly, gx = x0 + lx;
            float v = 0.0f;
            if (gz < a.d && gy < a.h && gx < a.w) v = dz[((((long long)n * a.d + gz) * a.h + gy) * a.w + gx) * COUT + c];
            sdz[i] = v;
        }
        stage_tile<CA, CB, CC, CK>(a, sin, n, z0, y0, x0, c0);
        __syncthreads();
        if (g < G) {
            for (int r = g; r < ROWS; r += G) {
                const int lz = r / TY, ly = r - lz * TY;
                const float* row = sin + cc * CS + (lz + kz) * PS + (ly + ky) * RS;
                const float* drow = sdz + r * TX * COUT;
                float a0 = row[0], a1 = row[1];
#pragma unroll 8
                for (int x = 0; x < TX; ++x) {
                    const float a2 = row[x + 2];
                    float dv[COUT];
                    if (COUT % 4 == 0) {
#pragma unroll
                        for (int q = 0; q < COUT / 4; ++q) {
                            const float4 t4 = reinterpret_cast<const float4*>(drow + x * COUT)[q];
                            dv[4 * q] = t4.x;
                            dv[4 * q + 1] = t4.y;
                            dv[4 * q + 2] = t4.z;
                            dv[4 * q + 3] = t4.w;
                        }
                    } else {
#pragma unroll
                        for (int c = 0; c < COUT; ++c) dv[c] = drow[x * COUT + c];
                    }
#pragma unroll
                    for (int c = 0; c < COUT; ++c) {
                        acc[0][c] = fmaf(dv[c], a0, acc[0][c]);
                        acc[1][c] = fmaf(dv[c], a1, acc[1][c]);
                        acc[2][c] = fmaf(dv[c], a2, acc[2][c]);
                    }
                    a0 = a1;
                    a1 = a2;
                }
            }
        }
    }
    // the groups' sums, in a fixed order
    __syncthreads();
    float* red = sdz;  // [THREADS][3][COUT]
#pragma unroll
    for (int k = 0; k < 3; ++k)
#pragma unroll
        for (int c = 0; c < COUT; ++c) red[(tid * 3 + k) * COUT + c] = acc[k][c];
    __syncthreads();
    for (int i = tid; i < NCOL * 3 * COUT; i += THREADS) {
        const int col2 = i / (3 * COUT);
        const int rem = i - col2 * 3 * COUT;
        const int kx = rem / COUT, co = rem - kx * COUT;
        double s = 0.0;
        for (int gg = 0; gg < G; ++gg) s += (double)red[(gg * NCOL + col2) * 3 * COUT + rem];
        const int cc2 = col2 / 9, kz2 = (col2 % 9) / 3, ky2 = col2 % 3;
        const int ci = c0 + cc2;
        a.part[(long long)blockIdx.x * NW + (co * CIN + ci) * 27 + kz2 * 9 + ky2 * 3 + kx] = s;
    }
}

// ---------------------------------------------------------------- run-time channel counts

// One thread per (voxel, output channel); weights [ci][27][co] as tconv_fwd. ca, cb, cc,
// cout: channel counts; n, d, h, w: the volume.
extern "C" __global__ void __launch_bounds__(256) tconv_fwd_any(const TrainArgs a) {
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

// Partial weight gradient over chunks of k0 voxels: part[chunk][w] for every weight
// w = (co·C_in + ci)·27 + k; count = chunks · NW; dz = in[3].
extern "C" __global__ void __launch_bounds__(256) tconv_wgrad_any(const TrainArgs a) {
    const int cin = a.ca + a.cb + a.cc, cout = a.cout;
    const long long nw = (long long)cout * cin * 27;
    const long long voxels = (long long)a.n * a.d * a.h * a.w;
    RLN_GRID_STRIDE(e, a.count) {
        const long long chunk_i = e / nw;
        const int wi = (int)(e % nw);
        const int co = wi / (cin * 27), ci = (wi / 27) % cin, k = wi % 27;
        const float* src;
        int cs, cl;
        if (ci < a.ca) { src = a.in[0]; cs = a.ca; cl = ci; }
        else if (ci < a.ca + a.cb) { src = a.in[1]; cs = a.cb; cl = ci - a.ca; }
        else { src = a.in[2]; cs = a.cc; cl = ci - a.ca - a.cb; }
        const int dzk = k / 9 - 1, dyk = (k / 3) % 3 - 1, dxk = k % 3 - 1;
        double s = 0.0;
        const long long v1 = min(voxels, (chunk_i + 1) * a.k0);
        for (long long vox = chunk_i * a.k0; vox < v1; ++vox) {
            const int x = (int)(vox % a.w), y = (int)((vox / a.w) % a.h), z = (int)((vox / ((long long)a.w * a.h)) % a.d);
            const long long n = vox / ((long long)a.w * a.h * a.d);
            const int gz = z + dzk, gy = y + dyk, gx = x + dxk;
            if (gz < 0 || gz >= a.d || gy < 0 || gy >= a.h || gx < 0 || gx >= a.w) continue;
            const long long v = ((n * a.d + gz) * a.h + gy) * a.w + gx;
            s += (double)(a.in[3][vox * cout + co] * src[v * cs + cl]);
        }
        a.part[e] = s;
    }
}

// ---------------------------------------------------------------- instantiations

#define RLN_TCONV_FWD(CA, CB, CC, COUT)                                                                 \
    extern "C" __global__ void __launch_bounds__(256, 2) tconv_fwd_##CA##_##CB##_##CC##_##COUT(const TrainArgs a) { \
        tconv_fwd<CA, CB, CC, COUT>(a);                                                                 \
    }
#define RLN_TCONV_WGRAD(CA, CB, CC, COUT)                                                                 \
    extern "C" __global__ void __launch_bounds__(256, 2) tconv_wgrad_##CA##_##CB##_##CC##_##COUT(const TrainArgs a) { \
        tconv_wgrad<CA, CB, CC, COUT>(a);                                                                 \
    }

// forward convs of rln-spec §3 (and h1/h2.fp.conv1 of the dual-view concat variant: 2→4)
RLN_TCONV_FWD(1, 0, 0, 4)
RLN_TCONV_FWD(2, 0, 0, 4)
RLN_TCONV_FWD(4, 0, 0, 4)
RLN_TCONV_FWD(4, 4, 0, 4)
RLN_TCONV_FWD(1, 0, 0, 8)
RLN_TCONV_FWD(8, 0, 0, 8)
RLN_TCONV_FWD(8, 8, 0, 8)
RLN_TCONV_FWD(8, 1, 1, 8)
// data gradients: dz (C_out of the layer) → one input's channels
RLN_TCONV_FWD(4, 0, 0, 1)
RLN_TCONV_FWD(8, 0, 0, 1)
// weight gradients: the forward convs
RLN_TCONV_WGRAD(1, 0, 0, 4)
RLN_TCONV_WGRAD(2, 0, 0, 4)
RLN_TCONV_WGRAD(4, 0, 0, 4)
RLN_TCONV_WGRAD(4, 4, 0, 4)
RLN_TCONV_WGRAD(1, 0, 0, 8)
RLN_TCONV_WGRAD(8, 0, 0, 8)
RLN_TCONV_WGRAD(8, 8, 0, 8)
RLN_TCONV_WGRAD(8, 1, 1, 8)
