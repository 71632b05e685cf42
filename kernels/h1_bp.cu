// Down-scale part, back projection at half resolution (rln-spec §3):
//   b1 = sp(BN4(conv(dv1; e4)))      1→8
//   b2 = sp(BN5(conv(b1; e5)))       8→8    (tensor cores in the f16 network)
//   b3 = sp(BN6(conv(b2‖b1; e6)))   16→8    (tensor cores in the f16 network)
#include "rln_common.cuh"
#include "conv_ffma.cuh"
#include "conv3_mma.cuh"

RLN_CONV_FFMA(h1_bp_conv1_f32, float, 1, 0, 0, 8, EPI_SP)
RLN_CONV_FFMA(h1_bp_conv1_f16, rln_h16, 1, 0, 0, 8, EPI_SP)
RLN_CONV_FFMA(h1_bp_conv1_bf16, rln_bf16, 1, 0, 0, 8, EPI_SP)
RLN_CONV_MMA(h1_bp_conv1_mma_f16, rln_h16, 1, 0, 0, 8, EPI_SP)
RLN_CONV_MMA(h1_bp_conv1_mma_bf16, rln_bf16, 1, 0, 0, 8, EPI_SP)
RLN_CONV_FFMA(h1_bp_conv2_f32, float, 8, 0, 0, 8, EPI_SP)
RLN_CONV_FFMA(h1_bp_conv2_f16, rln_h16, 8, 0, 0, 8, EPI_SP)
RLN_CONV_FFMA(h1_bp_conv2_bf16, rln_bf16, 8, 0, 0, 8, EPI_SP)
RLN_CONV_MMA(h1_bp_conv2_mma_f16, rln_h16, 8, 0, 0, 8, EPI_SP)
RLN_CONV_MMA(h1_bp_conv2_mma_bf16, rln_bf16, 8, 0, 0, 8, EPI_SP)
RLN_CONV_FFMA(h1_bp_conv3_f32, float, 8, 8, 0, 8, EPI_SP)
RLN_CONV_FFMA(h1_bp_conv3_f16, rln_h16, 8, 8, 0, 8, EPI_SP)
RLN_CONV_FFMA(h1_bp_conv3_bf16, rln_bf16, 8, 8, 0, 8, EPI_SP)
RLN_CONV_MMA(h1_bp_conv3_mma_f16, rln_h16, 8, 8, 0, 8, EPI_SP)
RLN_CONV_MMA(h1_bp_conv3_mma_bf16, rln_bf16, 8, 8, 0, 8, EPI_SP)
