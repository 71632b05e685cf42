// Down-scale part, back to full resolution and the first update (rln-spec §3):
//   u   = sp(BN7(up2(b3; e7)))                      8→4 (half → full resolution)
//   E1r = x · cm(bp1), bp1 = sp(BN8(conv(u; e8)))   4→4, bp1 never stored
//   E1  = sp(BN9(E1r))
#include "rln_common.cuh"
#include "conv_ffma.cuh"
#include "conv3_mma.cuh"
#include "up2.cuh"

extern "C" __global__ void __launch_bounds__(256) h1_bp_up_f32(const RlnArgs a) { up2_sp<float, 8, 4>(a); }
extern "C" __global__ void __launch_bounds__(256) h1_bp_up_f16(const RlnArgs a) { up2_sp<rln_h16, 8, 4>(a); }
extern "C" __global__ void __launch_bounds__(256) h1_bp_up_bf16(const RlnArgs a) { up2_sp<rln_bf16, 8, 4>(a); }

RLN_CONV_FFMA(h1_bp_conv4_e1_f32, float, 4, 0, 0, 4, EPI_UPDATE)
RLN_CONV_FFMA(h1_bp_conv4_e1_f16, rln_h16, 4, 0, 0, 4, EPI_UPDATE)
RLN_CONV_FFMA(h1_bp_conv4_e1_bf16, rln_bf16, 4, 0, 0, 4, EPI_UPDATE)
RLN_CONV_MMA(h1_bp_conv4_e1_mma_f16, rln_h16, 4, 0, 0, 4, EPI_UPDATE)
RLN_CONV_MMA(h1_bp_conv4_e1_mma_bf16, rln_bf16, 4, 0, 0, 4, EPI_UPDATE)
