// Down-scale part, forward projection and division at half resolution (rln-spec §3):
//   xd  = avgpool2(x)
//   a1  = sp(BN0(conv(xd; e1)))                 1→4
//   a2  = sp(BN1(conv(a1; e2)))                 4→4
//   dv1 = BN3(xd / (cm(fp1) + ε)), fp1 = sp(BN2(conv(a1‖a2; e3))) + sp(xd)   8→4, fp1 never stored
#include "rln_common.cuh"
#include "conv_ffma.cuh"
#include "conv3_mma.cuh"
#include "pool.cuh"

extern "C" __global__ void avgpool2_f32(const RlnArgs a) { avgpool2(a); }

RLN_CONV_FFMA(h1_fp_conv1_f32, float, 1, 0, 0, 4, EPI_SP)
RLN_CONV_FFMA(h1_fp_conv1_f16, rln_h16, 1, 0, 0, 4, EPI_SP)
RLN_CONV_FFMA(h1_fp_conv1_bf16, rln_bf16, 1, 0, 0, 4, EPI_SP)
RLN_CONV_MMA(h1_fp_conv1_mma_f16, rln_h16, 1, 0, 0, 4, EPI_SP)
RLN_CONV_MMA(h1_fp_conv1_mma_bf16, rln_bf16, 1, 0, 0, 4, EPI_SP)
RLN_CONV_FFMA(h1_fp_conv2_f32, float, 4, 0, 0, 4, EPI_SP)
RLN_CONV_FFMA(h1_fp_conv2_f16, rln_h16, 4, 0, 0, 4, EPI_SP)
RLN_CONV_FFMA(h1_fp_conv2_bf16, rln_bf16, 4, 0, 0, 4, EPI_SP)
RLN_CONV_MMA(h1_fp_conv2_mma_f16, rln_h16, 4, 0, 0, 4, EPI_SP)
RLN_CONV_MMA(h1_fp_conv2_mma_bf16, rln_bf16, 4, 0, 0, 4, EPI_SP)
RLN_CONV_FFMA(h1_fp_conv3_dv_f32, float, 4, 4, 0, 4, EPI_FP_DIV)
RLN_CONV_FFMA(h1_fp_conv3_dv_f16, rln_h16, 4, 4, 0, 4, EPI_FP_DIV)
RLN_CONV_FFMA(h1_fp_conv3_dv_bf16, rln_bf16, 4, 4, 0, 4, EPI_FP_DIV)
RLN_CONV_MMA(h1_fp_conv3_dv_mma_f16, rln_h16, 4, 4, 0, 4, EPI_FP_DIV)
RLN_CONV_MMA(h1_fp_conv3_dv_mma_bf16, rln_bf16, 4, 4, 0, 4, EPI_FP_DIV)
