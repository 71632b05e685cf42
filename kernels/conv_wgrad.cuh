// Weight gradient of the 3×3×3 conv (training, f32), both kernels write per-block partial
// sums that t_reduce_part (tensor_ops.cuh) reduces over blocks in a fixed order:
//   tconv_wgrad<CA, CB, CC, COUT>  the tile of conv3_tile.cuh (same geometry and staging as
//                                  the forward conv), threads mapped to weight columns
//   tconv_wgrad_rt                 run-time channel counts, one thread per (chunk, weight)
// Instantiated by RLN_TCONV_WGRAD in kernels/train_conv.cu.
#pragma once
#include "conv_ffma.cuh"

// dW[co][ci][kz][ky][kx] = Σ_voxels dz[v][co] · in[v + (kz-1, ky-1, kx-1)][ci].
// Grid: x = blocks walking the 32×8×4 tiles (tile t = blockIdx.x + k·gridDim.x), y = input
// channel chunks of CK. Thread = (column, group): a column is (cc, kz, ky) of the chunk and
// holds 3 (kx) × C_out accumulators; the G groups split the tile's 32 rows. Per x step a
// thread loads one input value (sliding window over kx) and C_out dz values (16-B
// broadcasts) for 3·C_out FMA. At the end the groups are summed in a fixed order (f64) and
// the block writes its partial of the chunk's weights to part[blockIdx.x][NW].
template <int CA, int CB, int CC, int COUT>
__device__ __forceinline__ void tconv_wgrad(const TrainArgs& a) {
    using namespace conv3;
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
    const TrainConvLoad<CA, CB, CC> ld{a};

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
        conv3_stage_tile<CK>(sin, n, z0, y0, x0, c0, a.d, a.h, a.w, ld);
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

#define RLN_TCONV_WGRAD(CA, CB, CC, COUT)                                                                 \
    extern "C" __global__ void __launch_bounds__(256, 2) tconv_wgrad_##CA##_##CB##_##CC##_##COUT(const TrainArgs a) { \
        tconv_wgrad<CA, CB, CC, COUT>(a);                                                                 \
    }

// Partial weight gradient over chunks of k0 voxels: part[chunk][w] for every weight
// w = (co·C_in + ci)·27 + k; count = chunks · NW; dz = in[3].
__device__ __forceinline__ void tconv_wgrad_rt(const TrainArgs& a) {
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
