// Module train_ops: the cheap ops of training and their gradients, one entry point each
// (the host's list: backend::cuda::train_launch::OPS_KERNELS). The code lives with its op:
// pool.cuh, up2.cuh (also used by inference), rl_nodes.cuh, bn.cuh, loss.cuh,
// tensor_ops.cuh. Each mirrors a function of backend::cpu::pointwise / up2 / train::loss
// (same order of operations where the CPU's order is visible in rounding). Reductions are
// deterministic: per-block partial sums in f64 (part[block][J]) summed by t_reduce_part in
// a fixed order; the grid of a reduction depends only on the element count.
#include "train_common.cuh"
#include "pool.cuh"
#include "up2.cuh"
#include "rl_nodes.cuh"
#include "bn.cuh"
#include "loss.cuh"
#include "tensor_ops.cuh"

// batch norm + activation (bn.cuh)
extern "C" __global__ void __launch_bounds__(256) t_epilogue(const TrainArgs a) { bn_epilogue(a); }
extern "C" __global__ void __launch_bounds__(256) t_chan_sum(const TrainArgs a) { bn_chan_sum(a); }
extern "C" __global__ void __launch_bounds__(256) t_epi_bwd1(const TrainArgs a) { bn_epilogue_bwd1(a); }
extern "C" __global__ void __launch_bounds__(256) t_epi_bwd2(const TrainArgs a) { bn_epilogue_bwd2(a); }
extern "C" __global__ void __launch_bounds__(256) t_bn_fold(const TrainArgs a) { bn_fold(a); }
// pooling (pool.cuh)
extern "C" __global__ void __launch_bounds__(256) t_avgpool2(const TrainArgs a) { avgpool2_train(a); }
// up2 (up2.cuh)
extern "C" __global__ void __launch_bounds__(256) t_up2_fwd(const TrainArgs a) { up2_fwd_train(a); }
extern "C" __global__ void __launch_bounds__(256) t_up2_bwd_data(const TrainArgs a) { up2_bwd_data(a); }
extern "C" __global__ void __launch_bounds__(256) t_up2_wgrad(const TrainArgs a) { up2_wgrad(a); }
// RL nodes (rl_nodes.cuh)
extern "C" __global__ void __launch_bounds__(256) t_channel_mean(const TrainArgs a) { channel_mean(a); }
extern "C" __global__ void __launch_bounds__(256) t_channel_mean_bwd(const TrainArgs a) { channel_mean_bwd(a); }
extern "C" __global__ void __launch_bounds__(256) t_rl_divide(const TrainArgs a) { rl_divide(a); }
extern "C" __global__ void __launch_bounds__(256) t_rl_divide_bwd(const TrainArgs a) { rl_divide_bwd(a); }
extern "C" __global__ void __launch_bounds__(256) t_rl_update(const TrainArgs a) { rl_update(a); }
extern "C" __global__ void __launch_bounds__(256) t_rl_update_bwd(const TrainArgs a) { rl_update_bwd(a); }
// loss (loss.cuh)
extern "C" __global__ void __launch_bounds__(256) t_loss_sums(const TrainArgs a) { loss_sums(a); }
extern "C" __global__ void __launch_bounds__(256) t_loss_finish(const TrainArgs a) { loss_finish(a); }
extern "C" __global__ void __launch_bounds__(256) t_loss_grad(const TrainArgs a) { loss_grad(a); }
// tensor plumbing (tensor_ops.cuh)
extern "C" __global__ void __launch_bounds__(256) t_accumulate(const TrainArgs a) { tensor_accumulate(a); }
extern "C" __global__ void __launch_bounds__(256) t_reshape(const TrainArgs a) { tensor_reshape(a); }
extern "C" __global__ void __launch_bounds__(256) t_reduce_part(const TrainArgs a) { reduce_part(a); }
extern "C" __global__ void __launch_bounds__(256) t_gather(const TrainArgs a) { tensor_gather(a); }
