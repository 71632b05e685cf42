"""Unaccelerated Richardson–Lucy in NumPy, the oracle of tests/real_data.rs.

The cudaDecon model, written independently of the engine: the FFT runs on the image
itself (periodic), the background is subtracted first (y <- max(y - b, 0)), the x and y
edges are blended over `apodize` voxels (Gustafsson's rule), the first estimate is y, and
each iteration is x <- max(x * H^T(y / max(H x, eps)), 0).

usage: rl_reference.py INPUT.tif PSF.tif OUTPUT.npy --iterations N --background B --apodize N
"""
import argparse

import numpy as np
import tifffile


def apodize(a, n):
    a = a.copy()
    for axis in (2, 1):
        a = np.moveaxis(a, axis, -1)
        diff = (a[..., -1] - a[..., 0]) / 2
        for k in range(min(n, a.shape[-1] // 2)):
            f = 1 - np.sin((k + 0.5) / n * np.pi / 2)
            a[..., k] += diff * f
            a[..., -1 - k] -= diff * f
        a = np.moveaxis(a, -1, axis)
    return a


def otf(psf, shape):
    """The PSF (centre at dims // 2) wrapped to the origin of a grid of `shape`, transformed."""
    buf = np.zeros(shape)
    c = [s // 2 for s in psf.shape]
    idx = np.ix_(*[(np.arange(psf.shape[a]) - c[a]) % shape[a] for a in range(3)])
    buf[idx] = psf / psf.sum()
    return np.fft.rfftn(buf)


def richardson_lucy(img, psf, iterations, background, napodize):
    y = np.maximum(img.astype(np.float64) - background, 0)
    if napodize:
        y = apodize(y, napodize)
    h = otf(psf.astype(np.float64), y.shape)
    axes = (0, 1, 2)
    x = y.copy()
    for _ in range(iterations):
        hx = np.fft.irfftn(np.fft.rfftn(x) * h, s=y.shape, axes=axes)
        ratio = y / np.maximum(hx, 1e-6)
        x = np.maximum(x * np.fft.irfftn(np.fft.rfftn(ratio) * np.conj(h), s=y.shape, axes=axes), 0)
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("psf")
    ap.add_argument("output")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--background", type=float, default=0.0)
    ap.add_argument("--apodize", type=int, default=0)
    a = ap.parse_args()
    out = richardson_lucy(tifffile.imread(a.input), tifffile.imread(a.psf), a.iterations, a.background, a.apodize)
    np.save(a.output, out.astype(np.float32))


if __name__ == "__main__":
    main()
