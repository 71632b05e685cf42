// The training loss (rln-spec §5, one global SSIM) on the device: its sums and its gradient
// (TrainArgs): the sums, the gradient's constants (t_loss_finish) and the gradient stay on
// the device; the host reads the 7 sums when it wants the loss (backend::loss::loss_from_sums).
#pragma once
#include "train_common.cuh"

// Loss sums (rln-spec §5), one channel: in[0] = y, in[1] = g, in[2] = E1r, in[3] = x.
// mode 0: part[block][2] = (Σ y, Σ g); mode 1 with stat = (μy, μg): part[block][5] =
// (Σ (y−μy)², Σ (g−μg)², Σ (y−μy)(g−μg), Σ (y−g)², Σ (E1r − (0.8g + 0.2x))²).
__device__ __forceinline__ void loss_sums(const TrainArgs& a) {
    __shared__ double sred[8 * 32];
    double s[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    const double my = a.mode == 1 ? a.stat[0] : 0.0, mg = a.mode == 1 ? a.stat[1] : 0.0;
    RLN_GRID_STRIDE(i, a.count) {
        const double y = (double)a.in[0][i], g = (double)a.in[1][i];
        if (a.mode == 0) {
            s[0] += y;
            s[1] += g;
        } else {
            const double dy = y - my, dg = g - mg;
            const double t = a.in[2][i] - (0.8 * g + 0.2 * (double)a.in[3][i]);
            s[0] += dy * dy;
            s[1] += dg * dg;
            s[2] += dy * dg;
            s[3] += (y - g) * (y - g);
            s[4] += t * t;
        }
    }
    const int k = a.mode == 0 ? 2 : 5;
#pragma unroll
    for (int q = 0; q < 5; ++q)
        if (q < k) rln_block_sum_by_channel(s[q], 1, a.part + (long long)blockIdx.x * k + q, sred);
}

// The constants of the loss gradient from the reduced sums, on the device (no host round
// trip between the sums and the gradient): stat[0..7] = (μy, μg, Σ(y−μy)², Σ(g−μg)²,
// Σ(y−μy)(g−μg), Σ(y−g)², Σ aux²) as t_reduce_part left them, dc[0] = n; writes
// stat[7..15] = (n, μy, μg, A, B, Cc, D, k) for t_loss_grad. The arithmetic of
// backend::loss::loss_from_sums on sums (n·μy, n·μg, …) in its order, every operation an
// explicitly rounded f64 intrinsic (no FMA contraction): the same bits as the host.
// One thread.
__device__ __forceinline__ void loss_finish(const TrainArgs& a) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const double n = a.dc[0];
    const double* v = a.stat;
    // the host: sum_y = v[0]·n, then μ = sum / n (not v[0] itself)
    const double muy = __ddiv_rn(__dmul_rn(v[0], n), n), mug = __ddiv_rn(__dmul_rn(v[1], n), n);
    const double vy = __ddiv_rn(v[2], n), vg = __ddiv_rn(v[3], n), cov = __ddiv_rn(v[4], n);
    const double A = __dadd_rn(__dmul_rn(__dmul_rn(2.0, muy), mug), 1e-4);
    const double B = __dadd_rn(__dmul_rn(2.0, cov), 9e-4);
    const double Cc = __dadd_rn(__dadd_rn(__dmul_rn(muy, muy), __dmul_rn(mug, mug)), 1e-4);
    const double D = __dadd_rn(__dadd_rn(vy, vg), 9e-4);
    const double ssim = __ddiv_rn(__dmul_rn(A, B), __dmul_rn(Cc, D));
    const double k = __ddiv_rn(-ssim, __dadd_rn(1.0, ssim));
    double* o = a.stat + 7;
    // the means as pass 2 used them (v[0], v[1]), as the host passed them before
    o[0] = n;
    o[1] = v[0];
    o[2] = v[1];
    o[3] = A;
    o[4] = B;
    o[5] = Cc;
    o[6] = D;
    o[7] = k;
}

// ∂L/∂y and ∂L/∂E1r (train::loss::loss_and_grad), in f64 per element: in[0..3] as
// t_loss_sums; out[0] = ∂y, out[1] = ∂E1r; stat = (n, μy, μg, A, B, Cc, D, k) on the
// device (t_loss_finish).
__device__ __forceinline__ void loss_grad(const TrainArgs& a) {
    const double n = a.stat[0], my = a.stat[1], mg = a.stat[2], A = a.stat[3], B = a.stat[4], Cc = a.stat[5],
                 D = a.stat[6], k = a.stat[7];
    RLN_GRID_STRIDE(i, a.count) {
        const double y = (double)a.in[0][i], g = (double)a.in[1][i];
        const double ds = (2.0 * mg / n) / A + (2.0 * (g - mg) / n) / B - (2.0 * my / n) / Cc - (2.0 * (y - my) / n) / D;
        a.out[0][i] = (float)(2.0 * (y - g) / n + k * ds);
        const double t = (double)a.in[2][i] - (0.8 * g + 0.2 * (double)a.in[3][i]);
        a.out[1][i] = (float)(0.1 * 2.0 * t / n);
    }
}
