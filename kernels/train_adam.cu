// The optimizer step of device-resident training (backend::cuda::train_params): Adam in
// the authors' TF1 form (rln-spec.md §5) and the batch-norm running-statistics update
// (§4), on the FP32 master weights with f64 moments. Every operation is an explicitly
// rounded f64 intrinsic (__dmul_rn, __dadd_rn, __ddiv_rn, __dsqrt_rn: IEEE round to
// nearest, never contracted into an FMA), in the order of the host code
// (train::adam::Adam::update, net::update_running_stats), so a step equals the CPU's bit
// for bit given the same gradients. All three kernels read no host memory and need no
// host synchronization (graph-capturable); a step whose gradients are not all finite
// changes nothing and says so in the status word.
#include "train_common.cuh"

// Status word out[0][0] = 1 when all count gradients in part[] are finite, else 0.
// mode 1 (steps queued without the host reading each one): sticky — a status already 0
// stays 0, so a failed step stops every later one until the host has read it; the loss
// sums in[1] (7 f64, when set) must be finite too; on the first failure the step index
// stat[1] (written by the host with lr_t) is recorded in stat[2].
// One block of 256 threads (the gradients are ~16 000 values).
extern "C" __global__ void __launch_bounds__(256) t_grad_check(const TrainArgs a) {
    __shared__ int bad;
    if (a.mode == 1 && a.out[0][0] != 1.0f) return;  // an earlier queued step failed
    if (threadIdx.x == 0) bad = 0;
    __syncthreads();
    int mine = 0;
    for (long long i = threadIdx.x; i < a.count; i += RLN_TRAIN_THREADS)
        if (!isfinite(a.part[i])) mine = 1;
    if (a.mode == 1 && a.in[1] != nullptr && threadIdx.x < 7 &&
        !isfinite(reinterpret_cast<const double*>(a.in[1])[threadIdx.x]))
        mine = 1;
    if (mine) bad = 1;  // every writer writes 1
    __syncthreads();
    if (threadIdx.x == 0) {
        a.out[0][0] = bad ? 0.0f : 1.0f;
        if (bad && a.mode == 1) a.stat[2] = a.stat[1];
    }
}

// One Adam step over count parameters, unless the status word in[0][0] is not 1:
//   m ← β1·m + (1−β1)·g,  v ← β2·v + (1−β2)·g·g,  w ← w − lr_t·m / (√v + ε)
// part = g (f64), stat = [m (count) | v (count)] (f64), out[0] = w (f32).
// in[1] = lr_t, one f64 in device memory (lr(t)·√(1−β2^(t+1))/(1−β1^(t+1)), computed on the
// host with f64 powf and written there before the step: a graph freezes kernel arguments,
// and CUDA's pow is not correctly rounded); dc = [-, β1, β2, ε, 1−β1, 1−β2].
extern "C" __global__ void __launch_bounds__(256) t_adam(const TrainArgs a) {
    if (a.in[0][0] != 1.0f) return;
    const double lr_t = *reinterpret_cast<const double*>(a.in[1]);
    const double b1 = a.dc[1], b2 = a.dc[2], eps = a.dc[3], c1 = a.dc[4], c2 = a.dc[5];
    double* m = a.stat;
    double* v = a.stat + a.count;
    RLN_GRID_STRIDE(i, a.count) {
        const double g = a.part[i];
        const double mi = __dadd_rn(__dmul_rn(b1, m[i]), __dmul_rn(c1, g));
        const double vi = __dadd_rn(__dmul_rn(b2, v[i]), __dmul_rn(__dmul_rn(c2, g), g));
        m[i] = mi;
        v[i] = vi;
        const double step = __ddiv_rn(__dmul_rn(lr_t, mi), __dadd_rn(__dsqrt_rn(vi), eps));
        a.out[0][i] = (float)__dsub_rn((double)a.out[0][i], step);
    }
}

// Running statistics r ← mom·r + (1−mom)·batch over count values, unless the status word
// in[0][0] is not 1: out[0] = r (f32, every BN layer's mean then variance), part = the
// batch's (f64, same layout), dc = [mom, 1−mom].
extern "C" __global__ void __launch_bounds__(256) t_running_stats(const TrainArgs a) {
    if (a.in[0][0] != 1.0f) return;
    const double mom = a.dc[0], rest = a.dc[1];
    RLN_GRID_STRIDE(i, a.count) {
        a.out[0][i] = (float)__dadd_rn(__dmul_rn(mom, (double)a.out[0][i]), __dmul_rn(rest, a.part[i]));
    }
}
