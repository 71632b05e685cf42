// Merge part (rln-spec §3):
//   f1 = sp(conv(E2; u5))                  1→8, no BN
//   f2 = sp(conv(f1‖E2‖E1; u6))           10→8, no BN (tensor cores in f16: C padded to 16)
//   y  = cm(f3), f3 = sp(BN16(conv(f1‖f2; u7)))   16→8 (tensor cores in f16), f3 never stored
#include "rln_common.cuh"
#include "conv_ffma.cuh"
#include "conv3_mma.cuh"

RLN_CONV_FFMA(h3_conv1_f32, float, 1, 0, 0, 8, EPI_SP)
RLN_CONV_FFMA(h3_conv1_f16, rln_h16, 1, 0, 0, 8, EPI_SP)
RLN_CONV_FFMA(h3_conv1_bf16, rln_bf16, 1, 0, 0, 8, EPI_SP)
RLN_CONV_MMA(h3_conv1_mma_f16, rln_h16, 1, 0, 0, 8, EPI_SP)
RLN_CONV_MMA(h3_conv1_mma_bf16, rln_bf16, 1, 0, 0, 8, EPI_SP)
RLN_CONV_FFMA(h3_conv2_f32, float, 8, 1, 1, 8, EPI_SP)
RLN_CONV_FFMA(h3_conv2_f16, rln_h16, 8, 1, 1, 8, EPI_SP)
RLN_CONV_FFMA(h3_conv2_bf16, rln_bf16, 8, 1, 1, 8, EPI_SP)
RLN_CONV_MMA(h3_conv2_mma_f16, rln_h16, 8, 1, 1, 8, EPI_SP)
RLN_CONV_MMA(h3_conv2_mma_bf16, rln_bf16, 8, 1, 1, 8, EPI_SP)
RLN_CONV_FFMA(h3_conv3_y_f32, float, 8, 8, 0, 8, EPI_MEAN)
RLN_CONV_FFMA(h3_conv3_y_f16, rln_h16, 8, 8, 0, 8, EPI_MEAN)
RLN_CONV_FFMA(h3_conv3_y_bf16, rln_bf16, 8, 8, 0, 8, EPI_MEAN)
RLN_CONV_MMA(h3_conv3_y_mma_f16, rln_h16, 8, 8, 0, 8, EPI_MEAN)
RLN_CONV_MMA(h3_conv3_y_mma_bf16, rln_bf16, 8, 8, 0, 8, EPI_MEAN)
