// Shared helpers of the RLN kernels. Included by every kernels/*.cu (build.rs inlines it
// for NVRTC, so keep it free of system includes: fp16 conversions are inline PTX).
#pragma once

// Grid-stride loop over n elements.
#define RLN_GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)gridDim.x * blockDim.x)

typedef unsigned int rln_u32;
typedef unsigned short rln_h16;  // the bits of an IEEE fp16 value

// ln(1 + e^t), stable for every t, accurate to a few ulp (the f32 network's softplus).
// fmaxf drops a NaN operand, but the log1pf term carries it, so NaN propagates.
__device__ __forceinline__ float rln_softplus(float t) {
    return fmaxf(t, 0.0f) + log1pf(expf(-fabsf(t)));
}

// Softplus through the special-function unit (ex2/lg2 approximations): absolute error
// ~1e-7, used where values are stored as fp16 anyway (relative precision 5e-4).
__device__ __forceinline__ float rln_softplus_fast(float t) {
    return fmaxf(t, 0.0f) + __logf(1.0f + __expf(-fabsf(t)));
}

template <bool FAST>
__device__ __forceinline__ float rln_sp(float t) {
    return FAST ? rln_softplus_fast(t) : rln_softplus(t);
}

__device__ __forceinline__ rln_h16 rln_f2h(float f) {
    rln_h16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float rln_h2f(rln_h16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Two fp16 values in one 32-bit word, the lower index in the low half (the layout of
// .f16x2 registers and of consecutive fp16 values in memory).
__device__ __forceinline__ rln_u32 rln_pack2(float lo, float hi) {
    return (rln_u32)rln_f2h(lo) | ((rln_u32)rln_f2h(hi) << 16);
}

// bfloat16 storage: the upper 16 bits of an f32 (8 significant bits, f32's exponent
// range). A struct, not a typedef of rln_h16, so that overloads tell the two apart.
struct rln_bf16 {
    rln_h16 bits;
};

// cvt.rn.bf16.f32: round to nearest even (sm_80+), as half::bf16::from_f32 on the host.
__device__ __forceinline__ rln_h16 rln_f2bf(float f) {
    rln_h16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float rln_bf2f(rln_h16 h) {
    float f;
    const rln_h16 zero = 0;
    asm("mov.b32 %0, {%1, %2};" : "=f"(f) : "h"(zero), "h"(h));  // {low, high}: bits << 16
    return f;
}

// Storage types: float (f32 network), rln_h16 (fp16 storage) or rln_bf16 (bf16
// storage); arithmetic is f32 in every case.
__device__ __forceinline__ float rln_to_f32(float v) { return v; }
__device__ __forceinline__ float rln_to_f32(rln_h16 v) { return rln_h2f(v); }
__device__ __forceinline__ float rln_to_f32(rln_bf16 v) { return rln_bf2f(v.bits); }
template <typename S> __device__ __forceinline__ S rln_from_f32(float v);
template <> __device__ __forceinline__ float rln_from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ rln_h16 rln_from_f32<rln_h16>(float v) { return rln_f2h(v); }
template <> __device__ __forceinline__ rln_bf16 rln_from_f32<rln_bf16>(float v) { return rln_bf16{rln_f2bf(v)}; }

// Two values of 16-bit storage type S (rln_h16 or rln_bf16) in one 32-bit word, the
// lower index in the low half.
// (The primary template is fp16's; callers instantiate it for float only in branches
// that sizeof(S) == 2 rules out.)
template <typename S> __device__ __forceinline__ rln_u32 rln_pack2s(float lo, float hi) { return rln_pack2(lo, hi); }
template <> __device__ __forceinline__ rln_u32 rln_pack2s<rln_bf16>(float lo, float hi) {
    return (rln_u32)rln_f2bf(lo) | ((rln_u32)rln_f2bf(hi) << 16);
}

// Activation tensors on the device are channels-last (N·D·H·W voxels × C). A tensor with
// one channel (x, xd, dv, E1, E2, y, E1r, E2r) is always float; a tensor with several
// channels has the network's storage type S.
template <typename S, int C> struct RlnStorage { typedef S type; };
template <typename S> struct RlnStorage<S, 1> { typedef float type; };

// Epilogues of a conv (after the folded batch-norm bias z = conv(W·scale) + shift;
// rl_nodes.cuh rln_epilogue_voxel computes them):
enum RlnEpilogue {
    // out[c] = sp(z[c]), C_out channels of type S
    EPI_SP = 0,
    // fp = sp(z) + sp(a), a = aux (1 channel); q = a / (cm(fp) + eps);
    // out = post_scale·q + post_shift (the dv node's batch norm, no softplus)
    EPI_FP_DIV = 1,
    // m = cm(sp(z)); e = aux·m; out_raw = e (if not null); out = sp(post_scale·e + post_shift)
    EPI_UPDATE = 2,
    // as EPI_UPDATE with m = cm(sp(z) + 1) (bp2 = sp(BN(conv)) + 1)
    EPI_UPDATE_PLUS1 = 3,
    // out = cm(sp(z)) (the prediction y)
    EPI_MEAN = 4,
};

// The one parameter block of every kernel; the Rust twin is backend::cuda::launch::KernelArgs.
struct RlnArgs {
    const void* in0;     // conv inputs, concatenated in this order (channels-last)
    const void* in1;
    const void* in2;
    const void* wt;      // weights (layout per kernel family)
    const float* bias;   // per output channel (the folded batch-norm shift)
    const float* aux;    // one-channel operand of the epilogue (a of the RL nodes)
    void* out;           // the output
    float* out_raw;      // E1r / E2r (EPI_UPDATE*), may be null
    int n, d, h, w;      // batch and volume size of the output (avgpool/up2: see there)
    float post_scale;    // the one-channel batch norm after an RL node
    float post_shift;
    float eps;           // div_eps of the RL division
    int pad_;
};
static_assert(sizeof(RlnArgs) == 96, "RlnArgs must match backend::cuda::launch::KernelArgs");

// Channel c (of the concatenation in0 ‖ in1 ‖ in2, widths CA, CB, CC) of voxel `vox`.
template <typename S, int CA, int CB, int CC>
__device__ __forceinline__ float rln_load_concat(const RlnArgs& a, long long vox, int c) {
    typedef typename RlnStorage<S, CA>::type TA;
    typedef typename RlnStorage<S, CB>::type TB;
    typedef typename RlnStorage<S, CC>::type TC;
    if (c < CA) return rln_to_f32(static_cast<const TA*>(a.in0)[vox * CA + c]);
    if (CB > 0 && c < CA + CB) return rln_to_f32(static_cast<const TB*>(a.in1)[vox * CB + (c - CA)]);
    if (CC > 0) return rln_to_f32(static_cast<const TC*>(a.in2)[vox * CC + (c - CA - CB)]);
    return 0.0f;
}

// Stores C values of one voxel (channels-last) as type S, with 16-B (or 8-B) stores
// where C allows (every multi-channel activation has C = 4 or 8, so its voxels are
// 16-B aligned in f32 and 8-B aligned in f16).
template <typename S, int C>
__device__ __forceinline__ void rln_store_voxel(void* out, long long vox, const float* v) {
    if (sizeof(S) == 4 && C % 4 == 0) {
        float4* o = reinterpret_cast<float4*>(static_cast<float*>(out) + vox * C);
#pragma unroll
        for (int q = 0; q < C / 4; ++q) o[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
    } else if (sizeof(S) == 2 && C == 8) {
        uint4* o = reinterpret_cast<uint4*>(static_cast<rln_h16*>(out) + vox * C);
        *o = make_uint4(rln_pack2s<S>(v[0], v[1]), rln_pack2s<S>(v[2], v[3]), rln_pack2s<S>(v[4], v[5]),
                        rln_pack2s<S>(v[6], v[7]));
    } else if (sizeof(S) == 2 && C == 4) {
        uint2* o = reinterpret_cast<uint2*>(static_cast<rln_h16*>(out) + vox * C);
        *o = make_uint2(rln_pack2s<S>(v[0], v[1]), rln_pack2s<S>(v[2], v[3]));
    } else {
        S* o = static_cast<S*>(out) + vox * C;
#pragma unroll
        for (int c = 0; c < C; ++c) o[c] = rln_from_f32<S>(v[c]);
    }
}
