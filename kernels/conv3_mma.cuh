// 3×3×3 conv on the tensor cores (mma.sync m16n8k16, fp16 or bf16 operands, f32
// accumulation), for the 2-byte-storage networks' convs with C_in ≥ 4 (4, 4‖4, 8,
// 10 → 16, 16) and C_out ∈ {4, 8}: as an implicit GEMM, M = 16 consecutive x voxels of
// one output row, N = 8 output channels (C_out = 4: columns 4..7 have zero weights and
// are dropped by the epilogue), K = 27 taps × C_in in one of three layouts
// (mmac::layout):
//   C16  C_in 10 or 16: k = tap·16 + c (10 → 16 with zero channels), 27 chunks of 16
//   C8   C_in 8 (one input or 4‖4): k = tap·8 + c, K 216 → 224 with a zero voxel, 14 chunks
//   P4   C_in 4: each smem voxel holds its own 4 channels and those of its x neighbour,
//        so one 16-B ldmatrix row at voxel x + kx covers taps kx and kx + 1; chunk
//        (kz, ky) = k-half 0 at kx = 0 (taps 0, 1) and k-half 1 at kx = 2 (taps 2 and a
//        zero-weight 3rd): 9 chunks, K 108 → 144 (vs 224 for 4 channels padded to 8)
//   X1   C_in 1 (an f32 node, rounded to S): each smem voxel holds the values of 8
//        consecutive x voxels, so one 16-B row covers kx = 0..2 (5 zero weights); k-half
//        = one (kz, ky), 9 of them + the zero voxel: 5 chunks, K 27 → 80
//
// Block: output tile TX×TY×TZ = 16×8×8, 8 warps; warp w owns the 8 rows (y = 0..7) of
// output plane z = w, in two groups of RG = 4 rows (4 independent mma chains).
// Shared memory: the input tile plus a one-voxel halo (18×10×10 voxels), channels-last,
// VS halves per voxel: C8 and P4 → 16 B; C16 → 48 B (32 B of data + 16 of padding, so
// that the 8 row addresses of one ldmatrix phase hit 8 different 16-B bank groups). One
// extra voxel of zeros at index NVOX stands in for tap 27 (C8).
// A fragments come from ldmatrix.x4 (lane l gives the address of row l & 15 of k-half
// l >> 4); B fragments (the folded weights) are packed on the host in fragment order,
// [chunk][lane][2] words (backend::cuda::weights::pack_mma_b), and live in registers.
// Accumulator (c0, c1) is voxel x = g, channels 2t, 2t+1; (c2, c3) voxel x = g + 8
// (g = lane >> 2, t = lane & 3).
#pragma once
#include "rln_common.cuh"

namespace mmac {
constexpr int TX = 16, TY = 8, TZ = 8;
constexpr int SX = TX + 2, SY = TY + 2, SZ = TZ + 2;
constexpr int NVOX = SX * SY * SZ;  // 1800
constexpr int THREADS = 256, RG = 4;
static_assert(THREADS / 32 == TZ, "one warp per output plane");
static_assert(TY % RG == 0, "row groups");

enum Layout { P4 = 0, C8 = 1, C16 = 2, X1 = 3 };
// backend::cuda::launch::mma_layout and the functions below are their twins
__host__ __device__ constexpr int layout(int cin) { return cin == 1 ? X1 : cin == 4 ? P4 : cin <= 8 ? C8 : C16; }
__host__ __device__ constexpr int voxel_halves(int cin) { return layout(cin) == C16 ? 24 : 8; }
__host__ __device__ constexpr int chunks(int cin) {
    return layout(cin) == X1 ? 5 : layout(cin) == P4 ? 9 : layout(cin) == C8 ? 14 : 27;
}
__host__ __device__ constexpr int smem_bytes(int cin) { return (NVOX + 1) * voxel_halves(cin) * 2; }
__host__ __device__ constexpr int tapoff(int tap) { return (tap / 9) * SY * SX + ((tap / 3) % 3) * SX + tap % 3; }
}  // namespace mmac

__device__ __forceinline__ void rln_ldmatrix_x4(rln_u32 addr, rln_u32& r0, rln_u32& r1, rln_u32& r2, rln_u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// D = A·B + D, m16n8k16, f32 accumulators; operands fp16 (S = rln_h16) or bf16 (rln_bf16).
template <typename S>
__device__ __forceinline__ void rln_mma_16816(float* c, rln_u32 a0, rln_u32 a1, rln_u32 a2, rln_u32 a3, rln_u32 b0,
                                              rln_u32 b1);
template <>
__device__ __forceinline__ void rln_mma_16816<rln_h16>(float* c, rln_u32 a0, rln_u32 a1, rln_u32 a2, rln_u32 a3,
                                                       rln_u32 b0, rln_u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void rln_mma_16816<rln_bf16>(float* c, rln_u32 a0, rln_u32 a1, rln_u32 a2, rln_u32 a3,
                                                        rln_u32 b0, rln_u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 8 (4) consecutive 16-bit channels of a voxel of an 8-channel (4-channel) tensor: 16 B (8 B).
__device__ __forceinline__ uint4 rln_load8h(const void* base, long long vox) {
    return static_cast<const uint4*>(base)[vox];
}
__device__ __forceinline__ uint2 rln_load4h(const void* base, long long vox) {
    return static_cast<const uint2*>(base)[vox];
}

// Fills smem voxel (gz, gy, gx)'s 8 or 16 channels (zeros outside the volume and beyond
// the channels): C16/C8: the concatenation in0 ‖ in1 ‖ in2 with CA = 8, then CB = 8 or
// CB = CC = 1 (f32, converted to S) or nothing; or CA = CB = 4; P4 (CA = 4 alone): the
// voxel's 4 channels, then those of voxel gx + 1.
template <typename S, int CA, int CB, int CC>
__device__ __forceinline__ void rln_gather_mma(const RlnArgs& a, int n, int gz, int gy, int gx, uint4& lo, uint4& hi) {
    static_assert((CA == 8 && ((CB == 0 && CC == 0) || (CB == 8 && CC == 0) || (CB == 1 && CC == 1))) ||
                      (CA == 4 && (CB == 0 || CB == 4) && CC == 0) || (CA == 1 && CB == 0 && CC == 0),
                  "mma input layout");
    lo = make_uint4(0u, 0u, 0u, 0u);
    hi = make_uint4(0u, 0u, 0u, 0u);
    if (gz < 0 || gz >= a.d || gy < 0 || gy >= a.h) return;
    const long long row = (((long long)n * a.d + gz) * a.h + gy) * a.w;
    if (CA == 1) {
        // X1: the f32 values of voxels gx .. gx + 7 of the row (zero outside), as S
        const float* in = static_cast<const float*>(a.in0) + row;
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = (gx + j >= 0 && gx + j < a.w) ? in[gx + j] : 0.0f;
        lo = make_uint4(rln_pack2s<S>(v[0], v[1]), rln_pack2s<S>(v[2], v[3]), rln_pack2s<S>(v[4], v[5]),
                        rln_pack2s<S>(v[6], v[7]));
        return;
    }
    if (CA == 4 && CB == 0) {
        if (gx >= 0 && gx < a.w) {
            const uint2 v = rln_load4h(a.in0, row + gx);
            lo.x = v.x;
            lo.y = v.y;
        }
        if (gx + 1 >= 0 && gx + 1 < a.w) {
            const uint2 v = rln_load4h(a.in0, row + gx + 1);
            lo.z = v.x;
            lo.w = v.y;
        }
        return;
    }
    if (gx < 0 || gx >= a.w) return;
    const long long vox = row + gx;
    if (CA == 4) {
        const uint2 v0 = rln_load4h(a.in0, vox), v1 = rln_load4h(a.in1, vox);
        lo = make_uint4(v0.x, v0.y, v1.x, v1.y);
        return;
    }
    lo = rln_load8h(a.in0, vox);
    if (CB == 8) hi = rln_load8h(a.in1, vox);
    if (CB == 1) hi.x = rln_pack2s<S>(static_cast<const float*>(a.in1)[vox], static_cast<const float*>(a.in2)[vox]);
}

template <typename S, int CA, int CB, int CC, int COUT, int EPI>
__device__ __forceinline__ void conv3_mma(const RlnArgs& a) {
    using namespace mmac;
    constexpr int CIN = CA + CB + CC;
    constexpr int LAY = layout(CIN);
    constexpr int VS = voxel_halves(CIN);
    constexpr int NCH = chunks(CIN);
    static_assert(COUT == 4 || COUT == 8, "C_out is 4 or 8 (N = 8)");
    static_assert(sizeof(S) == 2, "16-bit storage");
    extern __shared__ uint4 rln_smem_u4[];
    rln_h16* s = reinterpret_cast<rln_h16*>(rln_smem_u4);

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int tiles_z = (a.d + TZ - 1) / TZ;
    const int n = blockIdx.z / tiles_z;
    const int z0 = (blockIdx.z - n * tiles_z) * TZ, y0 = blockIdx.y * TY, x0 = blockIdx.x * TX;

    // B fragments of every K chunk, loaded once (coalesced: [chunk][lane] pairs)
    rln_u32 b[NCH][2];
    const uint2* wp = static_cast<const uint2*>(a.wt);
#pragma unroll
    for (int kc = 0; kc < NCH; ++kc) {
        const uint2 t = wp[kc * 32 + lane];
        b[kc][0] = t.x;
        b[kc][1] = t.y;
    }

    // the input tile (+ halo, zeros outside the volume) and the zero voxel
    for (int p = tid; p <= NVOX; p += THREADS) {
        uint4 lo = make_uint4(0u, 0u, 0u, 0u), hi = make_uint4(0u, 0u, 0u, 0u);
        if (p < NVOX) {
            const int sz = p / (SY * SX);
            const int r = p - sz * (SY * SX);
            const int sy = r / SX;
            const int sx = r - sy * SX;
            rln_gather_mma<S, CA, CB, CC>(a, n, z0 + sz - 1, y0 + sy - 1, x0 + sx - 1, lo, hi);
        }
        uint4* dst = reinterpret_cast<uint4*>(s + p * VS);
        dst[0] = lo;
        if (LAY == C16) dst[1] = hi;
    }
    __syncthreads();

    // this lane's ldmatrix row: voxel x = lane & 15 of the M tile, k-half lane >> 4
    // (C16: channels 8..15 of the tap, 16 B on; P4: taps kx = 2, 3, two voxels on)
    const int lrow = lane & 15, khalf = lane >> 4;
    const rln_u32 sbase = (rln_u32)__cvta_generic_to_shared(s);
    const rln_u32 zero_addr = sbase + NVOX * VS * 2;
    // smem voxel of output (x = lrow, y = 0, z = warp) at tap 0
    const int v0 = warp * SY * SX + lrow;
    const rln_u32 lane_addr = sbase + (rln_u32)(v0 * VS * 2) +
                              (LAY == C16 ? (rln_u32)(khalf * 16) : LAY == P4 ? (rln_u32)(khalf * 2 * VS * 2) : 0u);

    const int g = lane >> 2, t = lane & 3;
    // C_out = 4: lanes t = 2, 3 hold the zero-weight columns 4..7
    const bool real_cols = COUT == 8 || t < COUT / 2;
    const float bias0 = real_cols ? a.bias[2 * t] : 0.0f, bias1 = real_cols ? a.bias[2 * t + 1] : 0.0f;
    const int oz = z0 + warp;

#pragma unroll
    for (int grp = 0; grp < TY / RG; ++grp) {
        float acc[RG][4];
#pragma unroll
        for (int r = 0; r < RG; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < NCH; ++kc) {
#pragma unroll
            for (int r = 0; r < RG; ++r) {
                const int row_off = (grp * RG + r) * SX;  // output row y = grp·RG + r
                rln_u32 addr;
                if (LAY == C16) {
                    addr = lane_addr + (rln_u32)((row_off + tapoff(kc)) * VS * 2);
                } else if (LAY == P4) {
                    addr = lane_addr + (rln_u32)((row_off + tapoff(3 * kc)) * VS * 2);  // (kz, ky) = chunk
                } else if (LAY == X1) {
                    const int q0 = 2 * kc, q1 = 2 * kc + 1;  // (kz, ky) of k-halves 0 and 1
                    const rln_u32 a0 = lane_addr + (rln_u32)((row_off + tapoff(3 * q0)) * VS * 2);
                    const rln_u32 a1 = q1 < 9 ? lane_addr + (rln_u32)((row_off + tapoff(3 * q1)) * VS * 2) : zero_addr;
                    addr = khalf ? a1 : a0;
                } else {
                    const int t0 = 2 * kc, t1 = 2 * kc + 1;  // taps of k-halves 0 and 1
                    const rln_u32 a0 = lane_addr + (rln_u32)((row_off + tapoff(t0)) * VS * 2);
                    const rln_u32 a1 = t1 < 27 ? lane_addr + (rln_u32)((row_off + tapoff(t1)) * VS * 2) : zero_addr;
                    addr = khalf ? a1 : a0;
                }
                rln_u32 f0, f1, f2, f3;
                rln_ldmatrix_x4(addr, f0, f1, f2, f3);
                rln_mma_16816<S>(acc[r], f0, f1, f2, f3, b[kc][0], b[kc][1]);
            }
        }

        // epilogue of the group's rows; every lane takes part in the shuffles
#pragma unroll
        for (int r = 0; r < RG; ++r) {
            const int oy = y0 + grp * RG + r;
            const bool row_ok = oz < a.d && oy < a.h;
            const long long row_vox = (((long long)n * a.d + oz) * a.h + oy) * a.w + x0;
            const int xa = g, xb = g + 8;  // voxels of (c0, c1) and (c2, c3)
            if (EPI == EPI_SP) {
                // C_out/2 words a voxel; lane t writes channels 2t, 2t+1
                rln_u32* o = static_cast<rln_u32*>(a.out);
                if (real_cols && row_ok && x0 + xa < a.w)
                    o[(row_vox + xa) * (COUT / 2) + t] =
                        rln_pack2s<S>(rln_sp<true>(acc[r][0] + bias0), rln_sp<true>(acc[r][1] + bias1));
                if (real_cols && row_ok && x0 + xb < a.w)
                    o[(row_vox + xb) * (COUT / 2) + t] =
                        rln_pack2s<S>(rln_sp<true>(acc[r][2] + bias0), rln_sp<true>(acc[r][3] + bias1));
            } else {
                // Σ_c (sp(z_c) + one) over the lane's two channels, then over the quad's lanes
                const float one = EPI == EPI_UPDATE_PLUS1 ? 1.0f : 0.0f;
                float sa = 0.0f, sb = 0.0f;
                if (real_cols) {
                    sa = (rln_sp<true>(acc[r][0] + bias0) + one) + (rln_sp<true>(acc[r][1] + bias1) + one);
                    sb = (rln_sp<true>(acc[r][2] + bias0) + one) + (rln_sp<true>(acc[r][3] + bias1) + one);
                }
                sa += __shfl_xor_sync(0xffffffffu, sa, 1);
                sb += __shfl_xor_sync(0xffffffffu, sb, 1);
                if (COUT == 8) {
                    sa += __shfl_xor_sync(0xffffffffu, sa, 2);
                    sb += __shfl_xor_sync(0xffffffffu, sb, 2);
                }
                if (t == 0 && row_ok) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int x = h ? xb : xa;
                        if (x0 + x < a.w) {
                            const long long vox = row_vox + x;
                            const float m = (h ? sb : sa) * (1.0f / (float)COUT);
                            if (EPI == EPI_MEAN) {
                                static_cast<float*>(a.out)[vox] = m;
                            } else if (EPI == EPI_FP_DIV) {
                                // cm(sp(z) + sp(av)) = cm(sp(z)) + sp(av)
                                const float av = a.aux[vox];
                                const float q = av / ((m + rln_sp<true>(av)) + a.eps);
                                static_cast<float*>(a.out)[vox] = q * a.post_scale + a.post_shift;
                            } else {
                                const float e = m * a.aux[vox];
                                if (a.out_raw) a.out_raw[vox] = e;
                                static_cast<float*>(a.out)[vox] = rln_sp<true>(e * a.post_scale + a.post_shift);
                            }
                        }
                    }
                }
            }
        }
    }
}

// name(const RlnArgs): storage S (rln_h16 / rln_bf16), inputs CA ‖ CB ‖ CC, C_out, epilogue
#define RLN_CONV_MMA(name, S, CA, CB, CC, COUT, EPI)                                       \
    extern "C" __global__ void __launch_bounds__(mmac::THREADS, 2) name(const RlnArgs a) { \
        conv3_mma<S, CA, CB, CC, COUT, EPI>(a);                                             \
    }
