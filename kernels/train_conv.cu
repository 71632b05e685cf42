// Module train_conv: the conv kernels of training (the host's list is
// backend::cuda::train_launch::{FWD_VARIANTS, WGRAD_VARIANTS}; names tconv_*_{CA}_{CB}_{CC}_{COUT}).
//   tconv_fwd_*    forward over in[0] ‖ in[1] ‖ in[2] with the general epilogue, and the data
//                  gradient (flipped, transposed weights): conv_ffma.cuh, the tile of conv3_tile.cuh
//   tconv_wgrad_*  the weight gradient: conv_wgrad.cuh
//   *_any          run-time channel counts (slow fallbacks; the network never uses them)
//   tmma_*_bf16    the wide convs of `train --precision mixed` on the tensor cores (bf16
//                  operands, f32 accumulation): conv_mma_train.cuh (train_launch::MMA_VARIANTS)
#include "conv_ffma.cuh"
#include "conv_wgrad.cuh"
#include "conv_mma_train.cuh"

// forward convs of rln-spec §3 (and h1/h2.fp.conv1 of the dual-view concat variant: 2→4)
RLN_TCONV_FWD(1, 0, 0, 4)
RLN_TCONV_FWD(2, 0, 0, 4)
RLN_TCONV_FWD(4, 0, 0, 4)
RLN_TCONV_FWD(4, 4, 0, 4)
RLN_TCONV_FWD(1, 0, 0, 8)
RLN_TCONV_FWD(8, 0, 0, 8)
RLN_TCONV_FWD(8, 8, 0, 8)
RLN_TCONV_FWD(8, 1, 1, 8)
// data gradients: dz (C_out of the layer) → one input's channels
RLN_TCONV_FWD(4, 0, 0, 1)
RLN_TCONV_FWD(8, 0, 0, 1)
// weight gradients: the forward convs
RLN_TCONV_WGRAD(1, 0, 0, 4)
RLN_TCONV_WGRAD(2, 0, 0, 4)
RLN_TCONV_WGRAD(4, 0, 0, 4)
RLN_TCONV_WGRAD(4, 4, 0, 4)
RLN_TCONV_WGRAD(1, 0, 0, 8)
RLN_TCONV_WGRAD(8, 0, 0, 8)
RLN_TCONV_WGRAD(8, 8, 0, 8)
RLN_TCONV_WGRAD(8, 1, 1, 8)

// mixed precision: the wide convs (forward, data gradient 8→8 and 4→4, weight gradient)
RLN_TMMA(4, 0, 0, 4)
RLN_TMMA(4, 4, 0, 4)
RLN_TMMA(8, 0, 0, 8)
RLN_TMMA(8, 8, 0, 8)
RLN_TMMA(8, 1, 1, 8)

extern "C" __global__ void __launch_bounds__(256) tconv_fwd_any(const TrainArgs a) { tconv_fwd_rt(a); }
extern "C" __global__ void __launch_bounds__(256) tconv_wgrad_any(const TrainArgs a) { tconv_wgrad_rt(a); }
