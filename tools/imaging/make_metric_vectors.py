"""Reference SSIM / PSNR / NRMSE / percentiles from scikit-image and numpy for
tests/imaging_metrics.rs.

    pip install scikit-image numpy scipy
    python3 tools/imaging/make_metric_vectors.py   # writes tests/data/imaging/metric_*.npy + metric_ref.json

Volumes are stored as float32; the references are computed on their float64 cast with
structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=R), peak_signal_noise_ratio(data_range=R), normalized_root_mse (euclidean),
and np.percentile (linear) at 0.01 and 99.5.
"""
import json
import pathlib

import numpy as np
from scipy import ndimage as ndi
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data" / "imaging"


def pairs(rng):
    shape = (16, 40, 36)
    # random: uniform noise against a noisier copy
    a = rng.random(shape)
    yield "random", a, a + 0.3 * rng.standard_normal(shape), None
    # structured: blurred spheres and rods vs a blurrier, noisy, rescaled version
    g = np.zeros(shape)
    zz, yy, xx = np.indices(shape)
    for _ in range(12):
        c = rng.random(3) * shape
        r = rng.uniform(2, 5)
        g[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r] += rng.uniform(50, 850)
    g[5, 10:30, 7] += 400
    g = ndi.gaussian_filter(g, 0.7) + 30
    p = 2.0 * ndi.gaussian_filter(g, 1.2) + 10 + 20 * rng.standard_normal(shape)
    yield "structured", g, p, 900.0
    # edge case: a shape with 11 planes (minimum for the 11-tap window), ints as floats
    s2 = (11, 23, 29)
    a = rng.integers(0, 4000, s2).astype(float)
    yield "minimal", a, a + rng.integers(-200, 200, s2), 4000.0


def main():
    rng = np.random.default_rng(20240601)
    ref = {}
    for name, gt, pred, dr in pairs(rng):
        gt = gt.astype(np.float32)
        pred = pred.astype(np.float32)
        np.save(OUT / f"metric_{name}_gt.npy", gt)
        np.save(OUT / f"metric_{name}_pred.npy", pred)
        g64, p64 = gt.astype(np.float64), pred.astype(np.float64)
        if dr is None:
            dr = float(g64.max() - g64.min())
        ref[name] = dict(
            data_range=dr,
            ssim=float(structural_similarity(g64, p64, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=dr)),
            psnr=float(peak_signal_noise_ratio(g64, p64, data_range=dr)),
            nrmse=float(normalized_root_mse(g64, p64)),
            p_lo=float(np.percentile(gt, 0.01)),
            p_hi=float(np.percentile(gt, 99.5)),
        )
        print(name, gt.shape, ref[name])
    (OUT / "metric_ref.json").write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
