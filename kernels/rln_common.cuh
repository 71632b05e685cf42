// Shared helpers of the RLN kernels. Included by every kernels/*.cu (build.rs inlines it
// for NVRTC, so keep it free of system includes).
#pragma once

// Grid-stride loop over n elements.
#define RLN_GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)gridDim.x * blockDim.x)

// ln(1 + e^t), stable for every t.
__device__ __forceinline__ float rln_softplus(float t) {
    return fmaxf(t, 0.0f) + log1pf(__expf(-fabsf(t)));
}
