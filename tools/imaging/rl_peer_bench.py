"""scikit-image's richardson_lucy on the volume and PSF of rln_engine::imaging::rl::measure_throughput.

    pip install scikit-image numpy scipy
    python3 tools/imaging/rl_peer_bench.py [iterations]

Volume: 64×256×256 float32, 10.0 everywhere plus 1000 at n/500 voxels chosen by the
same xorshift64 sequence as rl::benchmark_volume. PSF: 31×31×31 Gaussian, σ (z, y, x) =
(2.0, 1.2, 1.2) voxels, normalized to sum 1. One warm-up iteration, then `iterations`
timed (clip=False, as the engine does not clip). Prints voxel-iterations per second.
"""
import json
import sys
import time

import numpy as np
from skimage.restoration import richardson_lucy


def benchmark_volume(dims):
    n = int(np.prod(dims))
    data = np.full(n, 10.0, dtype=np.float32)
    s = 0x9E3779B97F4A7C15
    m = (1 << 64) - 1
    for _ in range(n // 500):
        s ^= (s << 13) & m
        s ^= s >> 7
        s ^= (s << 17) & m
        data[s % n] += 1000.0
    return data.reshape(dims)


def gaussian_kernel(dims, sigma):
    axes = [np.exp(-0.5 * ((np.arange(d) - d // 2) / s) ** 2) for d, s in zip(dims, sigma)]
    k = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (k / k.sum()).astype(np.float32)


def main():
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    dims = (64, 256, 256)
    img = benchmark_volume(dims)
    psf = gaussian_kernel((31, 31, 31), (2.0, 1.2, 1.2))
    richardson_lucy(img, psf, num_iter=1, clip=False)
    t = time.perf_counter()
    out = richardson_lucy(img, psf, num_iter=iters, clip=False)
    sec = time.perf_counter() - t
    print(json.dumps(dict(peer="skimage.restoration.richardson_lucy", dims=dims, psf_dims=[31, 31, 31], iterations=iters,
                          seconds=sec, voxel_iterations_per_s=np.prod(dims) * iters / sec, dtype=str(out.dtype))))


if __name__ == "__main__":
    main()
