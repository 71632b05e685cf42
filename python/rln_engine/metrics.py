"""Image-quality metrics of a prediction against a ground truth, as ``rln-engine eval``
computes them (scikit-image's definitions, on 3D volumes)."""

from __future__ import annotations

from typing import Optional

from . import _rln_engine as _native


def _pair(gt, pred):
    from . import as_volume

    return as_volume(gt, "gt"), as_volume(pred, "pred")


def ssim(gt, pred, data_range: Optional[float] = None) -> float:
    """Structural similarity of two z,y,x volumes of one shape (Gaussian window σ = 1.5,
    as ``skimage.metrics.structural_similarity(..., gaussian_weights=True)``);
    ``data_range`` defaults to ``gt.max() - gt.min()``."""
    g, p = _pair(gt, pred)
    return _native.ssim(g, p, None if data_range is None else float(data_range))


def psnr(gt, pred, data_range: Optional[float] = None) -> float:
    """Peak signal-to-noise ratio in dB, ``10·log10(R² / MSE)``, with
    ``R = data_range`` (default ``gt.max() - gt.min()``)."""
    g, p = _pair(gt, pred)
    return _native.psnr(g, p, None if data_range is None else float(data_range))
