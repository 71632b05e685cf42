// Original-scale part (rln-spec §3):
//   c1  = sp(BN10(conv(x; u1)))                                      1→4
//   dv2 = BN12(x / (cm(fp2) + ε)), fp2 = sp(BN11(conv(c1; u2))) + sp(x)   4→4, fp2 never stored
//   d1  = sp(BN13(conv(dv2; u3)))                                    1→8
//   E2r = E1 · cm(bp2), bp2 = sp(BN14(conv(d1; u4))) + 1             8→8 (tensor cores in f16)
//   E2  = sp(BN15(E2r))
#include "rln_common.cuh"
#include "conv_ffma.cuh"
#include "conv3_mma.cuh"

RLN_CONV_FFMA(h2_fp_conv1_f32, float, 1, 0, 0, 4, EPI_SP)
RLN_CONV_FFMA(h2_fp_conv1_f16, rln_h16, 1, 0, 0, 4, EPI_SP)
RLN_CONV_FFMA(h2_fp_conv1_bf16, rln_bf16, 1, 0, 0, 4, EPI_SP)
RLN_CONV_MMA(h2_fp_conv1_mma_f16, rln_h16, 1, 0, 0, 4, EPI_SP)
RLN_CONV_MMA(h2_fp_conv1_mma_bf16, rln_bf16, 1, 0, 0, 4, EPI_SP)
RLN_CONV_FFMA(h2_fp_conv2_dv_f32, float, 4, 0, 0, 4, EPI_FP_DIV)
RLN_CONV_FFMA(h2_fp_conv2_dv_f16, rln_h16, 4, 0, 0, 4, EPI_FP_DIV)
RLN_CONV_FFMA(h2_fp_conv2_dv_bf16, rln_bf16, 4, 0, 0, 4, EPI_FP_DIV)
RLN_CONV_MMA(h2_fp_conv2_dv_mma_f16, rln_h16, 4, 0, 0, 4, EPI_FP_DIV)
RLN_CONV_MMA(h2_fp_conv2_dv_mma_bf16, rln_bf16, 4, 0, 0, 4, EPI_FP_DIV)
RLN_CONV_FFMA(h2_bp_conv1_f32, float, 1, 0, 0, 8, EPI_SP)
RLN_CONV_FFMA(h2_bp_conv1_f16, rln_h16, 1, 0, 0, 8, EPI_SP)
RLN_CONV_FFMA(h2_bp_conv1_bf16, rln_bf16, 1, 0, 0, 8, EPI_SP)
RLN_CONV_MMA(h2_bp_conv1_mma_f16, rln_h16, 1, 0, 0, 8, EPI_SP)
RLN_CONV_MMA(h2_bp_conv1_mma_bf16, rln_bf16, 1, 0, 0, 8, EPI_SP)
RLN_CONV_FFMA(h2_bp_conv2_e2_f32, float, 8, 0, 0, 8, EPI_UPDATE_PLUS1)
RLN_CONV_FFMA(h2_bp_conv2_e2_f16, rln_h16, 8, 0, 0, 8, EPI_UPDATE_PLUS1)
RLN_CONV_FFMA(h2_bp_conv2_e2_bf16, rln_bf16, 8, 0, 0, 8, EPI_UPDATE_PLUS1)
RLN_CONV_MMA(h2_bp_conv2_e2_mma_f16, rln_h16, 8, 0, 0, 8, EPI_UPDATE_PLUS1)
RLN_CONV_MMA(h2_bp_conv2_e2_mma_bf16, rln_bf16, 8, 0, 0, 8, EPI_UPDATE_PLUS1)
