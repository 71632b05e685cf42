// The network's cheap ops of training and their gradients (rln-spec §3, §5), f32,
// channels-last; each mirrors a function of backend::cpu::pointwise / up2 / train::loss
// (same order of operations where the CPU's order is visible in rounding). Reductions are
// deterministic: per-block partial sums in f64 (part[block][J]) summed by t_reduce_part in
// a fixed order; the grid of a reduction depends only on the element count.
#include "train_common.cuh"

// ---------------------------------------------------------------- elementwise

// out[0] = act(p0[c]·z + p1[c]) + addend; in[0] = z (C = ca channels), in[3] = addend tensor.
extern "C" __global__ void __launch_bounds__(256) t_epilogue(const TrainArgs a) {
    const int C = a.ca;
    RLN_GRID_STRIDE(e, a.count) { a.out[0][e] = rln_train_epi(a, a.in[0][e], (int)(e % C), e / C); }
}

// out[0] (n × d × h × w × C, the half size) = 2×2×2 means of in[0].
extern "C" __global__ void __launch_bounds__(256) t_avgpool2(const TrainArgs a) {
    const int C = a.ca;
    const long long H = 2LL * a.h, W = 2LL * a.w, D = 2LL * a.d;
    RLN_GRID_STRIDE(e, a.count) {
        const int c = (int)(e % C);
        const long long v = e / C;
        const long long k = v % a.w, j = (v / a.w) % a.h, z = (v / ((long long)a.w * a.h)) % a.d;
        const long long n = v / ((long long)a.w * a.h * a.d);
        float acc = 0.0f;
#pragma unroll
        for (int da = 0; da < 2; ++da)
#pragma unroll
            for (int db = 0; db < 2; ++db) {
                const long long r = ((n * D + 2 * z + da) * H + 2 * j + db) * W + 2 * k;
                acc += a.in[0][r * C + c] + a.in[0][(r + 1) * C + c];
            }
        a.out[0][e] = acc * 0.125f;
    }
}

// out[0][v] = (Σ_c in[0][v][c]) · (1/C); count = voxels.
extern "C" __global__ void __launch_bounds__(256) t_channel_mean(const TrainArgs a) {
    const int C = a.ca;
    const float inv = 1.0f / (float)C;
    RLN_GRID_STRIDE(v, a.count) {
        float s = 0.0f;
        for (int c = 0; c < C; ++c) s += a.in[0][v * C + c];
        a.out[0][v] = s * inv;
    }
}

// out[0][v][c] = in[0][v] · (1/C); count = voxels · C.
extern "C" __global__ void __launch_bounds__(256) t_channel_mean_bwd(const TrainArgs a) {
    const int C = a.ca;
    const float inv = 1.0f / (float)C;
    RLN_GRID_STRIDE(e, a.count) { a.out[0][e] = a.in[0][e / C] * inv; }
}

__device__ __forceinline__ float rln_cmean(const float* t, long long v, int C) {
    float s = 0.0f;
    for (int c = 0; c < C; ++c) s += t[v * C + c];
    return s * (1.0f / (float)C);
}

// q = a / (cm(fp) + eps): in[0] = a (1 ch), in[1] = fp (ca ch), f[0] = eps; count = voxels.
extern "C" __global__ void __launch_bounds__(256) t_rl_divide(const TrainArgs a) {
    RLN_GRID_STRIDE(v, a.count) { a.out[0][v] = a.in[0][v] / (rln_cmean(a.in[1], v, a.ca) + a.f[0]); }
}

// Gradients of q = a / (b + eps), b = cm(fp) (rln-spec §5): in[0] = a, in[1] = fp,
// in[2] = dq; out[0] = ∂a, out[1] = ∂fp (ca ch); mode 0 exact, 1 paper.
extern "C" __global__ void __launch_bounds__(256) t_rl_divide_bwd(const TrainArgs a) {
    const int C = a.ca;
    const float inv = 1.0f / (float)C;
    RLN_GRID_STRIDE(v, a.count) {
        const float den = rln_cmean(a.in[1], v, C) + a.f[0];
        const float q = a.in[0][v] / den;
        const float g = a.in[2][v];
        float da, db;
        if (a.mode == 0) {
            da = g / den;
            db = -q / den * g;
        } else {
            da = g;
            db = -q * q * g;
        }
        a.out[0][v] = da;
        const float dfp = db * inv;
        for (int c = 0; c < C; ++c) a.out[1][v * C + c] = dfp;
    }
}

// e = cm(bp) · a: in[0] = a (1 ch), in[1] = bp (ca ch); count = voxels.
extern "C" __global__ void __launch_bounds__(256) t_rl_update(const TrainArgs a) {
    RLN_GRID_STRIDE(v, a.count) { a.out[0][v] = rln_cmean(a.in[1], v, a.ca) * a.in[0][v]; }
}

// Gradients of e = a · cm(bp): in[0] = a, in[1] = bp, in[2] = de; out[0] = ∂a
// (exact cm(bp)·de, paper de), out[1] = ∂bp = a·de / C; mode 0 exact, 1 paper.
extern "C" __global__ void __launch_bounds__(256) t_rl_update_bwd(const TrainArgs a) {
    const int C = a.ca;
    const float inv = 1.0f / (float)C;
    RLN_GRID_STRIDE(v, a.count) {
        const float g = a.in[2][v];
        a.out[0][v] = a.mode == 0 ? rln_cmean(a.in[1], v, C) * g : g;
        const float dbp = (a.in[0][v] * g) * inv;
        for (int c = 0; c < C; ++c) a.out[1][v * C + c] = dbp;
    }
}

// out[0] += in[0]
extern "C" __global__ void __launch_bounds__(256) t_accumulate(const TrainArgs a) {
    RLN_GRID_STRIDE(e, a.count) { a.out[0][e] += a.in[0][e]; }
}

__device__ __forceinline__ int rln_mirror(int i, int n) { return i < n ? i : 2 * n - 1 - i; }

// Shape changes: out[0] is n × d × h × w × C (ca channels), in[0] is n × k0 × k1 × k2 × C.
// mode 0: mirror pad (symmetric, edge repeated), 1: crop (leading corner), 2: uncrop (zeros
// outside the source).
extern "C" __global__ void __launch_bounds__(256) t_reshape(const TrainArgs a) {
    const int C = a.ca;
    RLN_GRID_STRIDE(e, a.count) {
        const int c = (int)(e % C);
        const long long v = e / C;
        const int x = (int)(v % a.w), y = (int)((v / a.w) % a.h), z = (int)((v / ((long long)a.w * a.h)) % a.d);
        const long long n = v / ((long long)a.w * a.h * a.d);
        int sz = z, sy = y, sx = x;
        if (a.mode == 0) {
            sz = rln_mirror(z, a.k0);
            sy = rln_mirror(y, a.k1);
            sx = rln_mirror(x, a.k2);
        } else if (a.mode == 2 && (z >= a.k0 || y >= a.k1 || x >= a.k2)) {
            a.out[0][e] = 0.0f;
            continue;
        }
        a.out[0][e] = a.in[0][(((n * a.k0 + sz) * a.k1 + sy) * a.k2 + sx) * C + c];
    }
}

// ---------------------------------------------------------------- up2 (2×2×2 transposed conv)
// Weights in engine layout W[in][o][a][b][c] (wt); ca = C_in, cout = C_out (≤ 16).

// out[0][2i+p, 2j+q, 2k+r][o] = epi(Σ_in in[0][i, j, k][in] · W[in][o][p][q][r]); n, d, h, w =
// the OUTPUT (full) size; count = output voxels.
extern "C" __global__ void __launch_bounds__(256) t_up2_fwd(const TrainArgs a) {
    const int CI = a.ca, CO = a.cout;
    const int hd = a.d / 2, hh = a.h / 2, hw = a.w / 2;
    RLN_GRID_STRIDE(ov, a.count) {
        const int ox = (int)(ov % a.w), oy = (int)((ov / a.w) % a.h), oz = (int)((ov / ((long long)a.w * a.h)) % a.d);
        const long long n = ov / ((long long)a.w * a.h * a.d);
        const int pqr = (oz & 1) * 4 + (oy & 1) * 2 + (ox & 1);
        const long long iv = ((n * hd + (oz >> 1)) * hh + (oy >> 1)) * hw + (ox >> 1);
        for (int o = 0; o < CO; ++o) {
            float s = 0.0f;
            for (int c = 0; c < CI; ++c) s += a.in[0][iv * CI + c] * a.wt[(c * CO + o) * 8 + pqr];
            a.out[0][ov * CO + o] = rln_train_epi(a, s, o, ov);
        }
    }
}

// ∂t[i, j, k][in] = Σ_{o,p,q,r} dz[2i+p, 2j+q, 2k+r][o] · W[in][o][p][q][r]: in[0] = dz
// (cout ch, full size), out[0] = ∂t (ca ch); n, d, h, w = the HALF size; count = half voxels · C_in.
extern "C" __global__ void __launch_bounds__(256) t_up2_bwd_data(const TrainArgs a) {
    const int CI = a.ca, CO = a.cout;
    const long long D2 = 2LL * a.d, H2 = 2LL * a.h, W2 = 2LL * a.w;
    RLN_GRID_STRIDE(e, a.count) {
        const int ci = (int)(e % CI);
        const long long v = e / CI;
        const long long k = v % a.w, j = (v / a.w) % a.h, i = (v / ((long long)a.w * a.h)) % a.d;
        const long long n = v / ((long long)a.w * a.h * a.d);
        float s = 0.0f;
        for (int o = 0; o < CO; ++o)
            for (int p = 0; p < 2; ++p)
                for (int q = 0; q < 2; ++q) {
                    const long long r0 = ((n * D2 + 2 * i + p) * H2 + 2 * j + q) * W2 + 2 * k;
                    const float* wk = a.wt + ((ci * CO + o) * 2 + p) * 4 + q * 2;
                    s += a.in[0][r0 * CO + o] * wk[0] + a.in[0][(r0 + 1) * CO + o] * wk[1];
                }
        a.out[0][e] = s;
    }
}

// Partial weight gradient of up2 over chunks of k0 half-resolution voxels: one thread per
// (chunk, in, pqr) accumulates all C_out weights W[in][o][pqr]; part[chunk][in·CO·8 + o·8 + pqr].
// in[0] = t (ca ch, half size n × d × h × w), in[3] = dz (cout ch, full size); count = chunks · C_in · 8.
extern "C" __global__ void __launch_bounds__(256) t_up2_wgrad(const TrainArgs a) {
    const int CI = a.ca, CO = a.cout;
    const long long hv = (long long)a.n * a.d * a.h * a.w;
    const long long D2 = 2LL * a.d, H2 = 2LL * a.h, W2 = 2LL * a.w;
    RLN_GRID_STRIDE(e, a.count) {
        const int pqr = (int)(e % 8);
        const int ci = (int)((e / 8) % CI);
        const long long ch = e / (8LL * CI);
        const int p = pqr >> 2, q = (pqr >> 1) & 1, r = pqr & 1;
        float acc[16];
#pragma unroll
        for (int o = 0; o < 16; ++o) acc[o] = 0.0f;
        const long long v1 = min(hv, (ch + 1) * a.k0);
        for (long long v = ch * a.k0; v < v1; ++v) {
            const long long k = v % a.w, j = (v / a.w) % a.h, i = (v / ((long long)a.w * a.h)) % a.d;
            const long long n = v / ((long long)a.w * a.h * a.d);
            const float t = a.in[0][v * CI + ci];
            const long long ov = ((n * D2 + 2 * i + p) * H2 + 2 * j + q) * W2 + 2 * k + r;
#pragma unroll
            for (int o = 0; o < 16; ++o)
                if (o < CO) acc[o] = fmaf(t, a.in[3][ov * CO + o], acc[o]);
        }
        double* dst = a.part + ch * (long long)(CI * CO * 8);
#pragma unroll
        for (int o = 0; o < 16; ++o)
            if (o < CO) dst[(ci * CO + o) * 8 + pqr] = (double)acc[o];
    }
}

// ---------------------------------------------------------------- reductions

// Per-channel sums of one tensor (ca = C channels, a power of two ≤ 16): mode 0 Σ x,
// mode 1 Σ (x − stat[c])². part[block][C]; count = elements.
extern "C" __global__ void __launch_bounds__(256) t_chan_sum(const TrainArgs a) {
    __shared__ double sred[8 * 32];
    const int C = a.ca;
    const int c = threadIdx.x % C;
    const double mu = a.mode == 1 ? a.stat[c] : 0.0;
    double s = 0.0;
    RLN_GRID_STRIDE(e, a.count) {
        const double v = (double)a.in[0][e];
        s += a.mode == 1 ? (v - mu) * (v - mu) : v;
    }
    rln_block_sum_by_channel(s, C, a.part + (long long)blockIdx.x * C, sred);
}

// Pass 1 of the epilogue gradient (rln-spec §4 batch norm in training mode, then softplus):
// x̂ = (z − mean)·inv_std, dh = dy·σ(γ·x̂ + β) (softplus, mode bit 0) or dy; out[0] = dh;
// with mode bit 1 (batch norm) the per-channel sums Σ dh, Σ dh·x̂ go to part[block][2C].
// in[0] = z, in[1] = dy; p[0..3] = γ, β, mean, inv_std (1, 0, 0, 1 without batch norm).
extern "C" __global__ void __launch_bounds__(256) t_epi_bwd1(const TrainArgs a) {
    __shared__ double sred[8 * 32];
    const int C = a.ca;
    const int c = threadIdx.x % C;
    const float gamma = a.p[0][c], beta = a.p[1][c], mean = a.p[2][c], inv_std = a.p[3][c];
    const bool sp = a.mode & 1;
    double s1 = 0.0, s2 = 0.0;
    RLN_GRID_STRIDE(e, a.count) {
        const float xh = (a.in[0][e] - mean) * inv_std;
        const float dh = sp ? a.in[1][e] * rln_sigmoid(gamma * xh + beta) : a.in[1][e];
        a.out[0][e] = dh;
        s1 += (double)dh;
        s2 += (double)(dh * xh);
    }
    if (a.mode & 2) {
        rln_block_sum_by_channel(s1, C, a.part + (long long)blockIdx.x * 2 * C, sred);
        rln_block_sum_by_channel(s2, C, a.part + (long long)blockIdx.x * 2 * C + C, sred);
    }
}

// Pass 2: ∂z = γ·inv_std·(dh − Σdh/m − x̂·Σ(dh·x̂)/m), in place on out[0] = dh; in[0] = z;
// stat = [Σ dh (C), Σ dh·x̂ (C)]; dc[0] = m (voxels per channel).
extern "C" __global__ void __launch_bounds__(256) t_epi_bwd2(const TrainArgs a) {
    const int C = a.ca;
    RLN_GRID_STRIDE(e, a.count) {
        const int c = (int)(e % C);
        const float k = a.p[0][c] * a.p[3][c];
        const float mb = (float)(a.stat[c] / a.dc[0]), mg = (float)(a.stat[C + c] / a.dc[0]);
        const float xh = (a.in[0][e] - a.p[2][c]) * a.p[3][c];
        a.out[0][e] = k * (a.out[0][e] - mb - xh * mg);
    }
}

// Loss sums (rln-spec §5), one channel: in[0] = y, in[1] = g, in[2] = E1r, in[3] = x.
// mode 0: part[block][2] = (Σ y, Σ g); mode 1 with stat = (μy, μg): part[block][5] =
// (Σ (y−μy)², Σ (g−μg)², Σ (y−μy)(g−μg), Σ (y−g)², Σ (E1r − (0.8g + 0.2x))²).
extern "C" __global__ void __launch_bounds__(256) t_loss_sums(const TrainArgs a) {
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
extern "C" __global__ void __launch_bounds__(256) t_loss_grad(const TrainArgs a) {
    const double n = a.dc[0], my = a.dc[1], mg = a.dc[2], A = a.dc[3], B = a.dc[4], Cc = a.dc[5], D = a.dc[6], k = a.dc[7];
    RLN_GRID_STRIDE(i, a.count) {
        const double y = (double)a.in[0][i], g = (double)a.in[1][i];
        const double ds = (2.0 * mg / n) / A + (2.0 * (g - mg) / n) / B - (2.0 * my / n) / Cc - (2.0 * (y - my) / n) / D;
        a.out[0][i] = (float)(2.0 * (y - g) / n + k * ds);
        const double t = (double)a.in[2][i] - (0.8 * g + 0.2 * (double)a.in[3][i]);
        a.out[1][i] = (float)(0.1 * 2.0 * t / n);
    }
}

// stat[j] = dc[0] · Σ_b part[b][j] for j < k0 (J), b < k1 (blocks): one block per j,
// threads take b = tid, tid + 256, …, then a fixed tree.
extern "C" __global__ void __launch_bounds__(256) t_reduce_part(const TrainArgs a) {
    __shared__ double sred[256];
    const int j = blockIdx.x;
    const int J = a.k0, nb = a.k1;
    double s = 0.0;
    for (int b = threadIdx.x; b < nb; b += 256) s += a.part[(long long)b * J + j];
    sred[threadIdx.x] = s;
    __syncthreads();
    for (int off = 128; off > 0; off >>= 1) {
        if ((int)threadIdx.x < off) sred[threadIdx.x] += sred[threadIdx.x + off];
        __syncthreads();
    }
    if (threadIdx.x == 0) a.stat[j] = sred[0] * a.dc[0];
}
