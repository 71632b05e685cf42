// Tile transfers in fp16 (`infer --fp16`): the streaming predictor copies tiles to and
// from the device as fp16 bits, half the bytes of f32 over PCIe, and converts them here
// (the network's one-channel input and output stay f32 on the device, kernels/NOTES.md).
//   rln_h16_to_f32: out[i] = f32(in[i])          (an input tile after its copy in)
//   rln_f32_to_h16: out[i] = fp16_rn(in[i])      (a prediction before its copy out)
#include "rln_common.cuh"

extern "C" __global__ void rln_h16_to_f32(const rln_h16* __restrict__ in, float* __restrict__ out,
                                          long long n) {
    RLN_GRID_STRIDE(i, n) { out[i] = rln_h2f(in[i]); }
}

extern "C" __global__ void rln_f32_to_h16(const float* __restrict__ in, rln_h16* __restrict__ out,
                                          long long n) {
    RLN_GRID_STRIDE(i, n) { out[i] = rln_f2h(in[i]); }
}
