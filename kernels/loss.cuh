// The training loss (rln-spec §5, one global SSIM) on the device: its sums and its gradient
// (TrainArgs; the host computes the loss from the 7 sums, train::loss::loss_from_sums).
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

// ∂L/∂y and ∂L/∂E1r (train::loss::loss_and_grad), in f64 per element: in[0..3] as
// t_loss_sums; out[0] = ∂y, out[1] = ∂E1r; dc = (n, μy, μg, A, B, Cc, D, k).
__device__ __forceinline__ void loss_grad(const TrainArgs& a) {
    const double n = a.dc[0], my = a.dc[1], mg = a.dc[2], A = a.dc[3], B = a.dc[4], Cc = a.dc[5], D = a.dc[6], k = a.dc[7];
    RLN_GRID_STRIDE(i, a.count) {
        const double y = (double)a.in[0][i], g = (double)a.in[1][i];
        const double ds = (2.0 * mg / n) / A + (2.0 * (g - mg) / n) / B - (2.0 * my / n) / Cc - (2.0 * (y - my) / n) / D;
        a.out[0][i] = (float)(2.0 * (y - g) / n + k * ds);
        const double t = (double)a.in[2][i] - (0.8 * g + 0.2 * (double)a.in[3][i]);
        a.out[1][i] = (float)(0.1 * 2.0 * t / n);
    }
}
