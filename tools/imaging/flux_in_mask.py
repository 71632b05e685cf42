"""Intensity conservation of deconvolved volumes against their raw input, object by object.

A global sum Σ(v − level) over a whole volume is dominated by the background: on the
84×320×480 LLS crop, 1 ADU of level error moves it by ~10%. So this measures the flux of
the objects only: the mask is where the raw volume, smoothed by a 5³ mean, exceeds its
background + THRESHOLD, grown by 4 voxels (6-connected); each volume's own background is
its median outside the mask, and its flux is Σ_mask (v − that median). Ratios are to the
raw input (its background is --raw-background, e.g. the camera offset + background that
RL subtracted, 98 ADU for pycudadecon's LLS data).

--by-level E0 E1 ... also splits the first threshold's mask by the smoothed raw's level
above its background (bins below E0, [E0, E1), ..., at or above the last: the mask's
grown rim is mostly below E0) and prints each
volume's ratio per bin: where the flux went, dim surroundings or bright cores (any
deconvolution moves some from the first to the second; RL 10 it. moves little).

usage: flux_in_mask.py RAW.tif LABEL=VOLUME.tif ... [--raw-background 98] [--threshold 2 5 10]
       [--by-level 2 5 10 20 50]
"""
import argparse

import numpy as np
import scipy.ndimage as nd
import tifffile


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw")
    ap.add_argument("volumes", nargs="+", help="LABEL=FILE, same shape as RAW")
    ap.add_argument("--raw-background", type=float, default=98.0)
    ap.add_argument("--threshold", type=float, nargs="+", default=[2.0, 5.0, 10.0])
    ap.add_argument("--by-level", type=float, nargs="+", default=None, metavar="EDGE")
    a = ap.parse_args()
    raw = tifffile.imread(a.raw).astype(np.float64)
    vols = {}
    for spec in a.volumes:
        label, _, path = spec.partition("=")
        v = tifffile.imread(path).astype(np.float64)
        if v.shape != raw.shape:
            raise SystemExit(f"{path}: shape {v.shape} differs from the raw's {raw.shape}")
        vols[label] = v
    smooth = nd.uniform_filter(raw, 5)
    first_mask = None
    for t in a.threshold:
        mask = nd.binary_dilation(smooth > a.raw_background + t, iterations=4)
        first_mask = mask if first_mask is None else first_mask
        raw_flux = (raw[mask] - a.raw_background).sum()
        print(f"threshold {t:g}: mask {mask.mean():.3f} of the volume, raw flux {raw_flux:.4g}")
        for label, v in vols.items():
            bg = float(np.median(v[~mask]))
            flux = (v[mask] - bg).sum()
            print(f"  {label:<20} background {bg:9.3f}  flux {flux:.4g}  ratio {flux / raw_flux:.4f}")
    if a.by_level:
        edges = [-np.inf] + sorted(a.by_level) + [np.inf]
        mask = first_mask
        level = smooth - a.raw_background
        bins = [mask & (level >= lo) & (level < hi) for lo, hi in zip(edges, edges[1:])]
        names = [f"<{hi:g}" if lo == -np.inf else f"≥{lo:g}" if hi == np.inf else f"{lo:g}-{hi:g}" for lo, hi in zip(edges, edges[1:])]
        print(f"by the smoothed raw's level above {a.raw_background:g} (mask of threshold {a.threshold[0]:g}):")
        print("  " + " " * 20 + "".join(f"{n:>12}" for n in names))
        print("  " + "share of volume".ljust(20) + "".join(f"{b.mean():12.3f}" for b in bins))
        for label, v in vols.items():
            bg = float(np.median(v[~mask]))
            r = [(v[b] - bg).sum() / (raw[b] - a.raw_background).sum() if b.any() else float("nan") for b in bins]
            print(f"  {label:<20}" + "".join(f"{x:12.3f}" for x in r))


if __name__ == "__main__":
    main()
