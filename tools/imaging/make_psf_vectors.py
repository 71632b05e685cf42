"""Reference PSFs from psfmodels' scalar Gibson–Lanni model for tests/imaging_psf.rs.

    pip install psfmodels numpy
    python3 tools/imaging/make_psf_vectors.py   # writes tests/data/imaging/psf_*.npy + psf_sets.json

Each set is computed with psfmodels.make_psf(nz, nx, ..., model="scalar") and saved as
float32 normalized to sum 1. For point sampling (oversample 1) psfmodels evaluates the
radial profile only every dxy and interpolates linearly between, which is 5% off its own
converged value at dxy = 0.1 µm; such sets are evaluated on a 5× finer grid (nx·5 pixels
of dxy/5, still oversample 1) and subsampled at the pixel centers, which is psfmodels'
model without that interpolation error (psfmodels normalizes the peak; the engine the sum). Keys of
psf_sets.json use the engine's names (psfmodels' NA → na, wvl → wavelength,
oversample_factor → oversample).
"""
import json
import pathlib

import numpy as np
import psfmodels

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data" / "imaging"

SETS = {
    # psfmodels defaults except sampling
    "default": dict(nx=33, nz=33, dxy=0.05, dz=0.1),
    # matched indices (Airy in focus), point source on the coverslip
    "matched": dict(nx=31, nz=31, dxy=0.04, dz=0.08, wvl=0.52, ns=1.515),
    # depth aberration: 10 µm into water with an oil objective
    "depth_aberrated": dict(nx=41, nz=35, dxy=0.065, dz=0.15, pz=10.0, ns=1.33, wvl=0.6),
    # lower NA, aqueous sample 5 µm deep, no pixel integration
    "na1_water": dict(nx=35, nz=31, dxy=0.1, dz=0.2, NA=1.0, ns=1.33, pz=5.0, wvl=0.51, oversample_factor=1),
    # wrong coverslip thickness and index, source 2 µm deep
    "coverslip_mismatch": dict(nx=33, nz=35, dxy=0.06, dz=0.12, tg=180.0, ng=1.52, pz=2.0, ns=1.45, wvl=0.55),
}

DEFAULTS = dict(NA=1.4, wvl=0.6, ns=1.47, ni=1.515, ni0=1.515, ng=1.515, ng0=1.515, tg=170.0, tg0=170.0,
                ti0=150.0, pz=0.0, oversample_factor=3)
RENAME = {"NA": "na", "wvl": "wavelength", "oversample_factor": "oversample"}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {}
    for name, over in SETS.items():
        p = dict(DEFAULTS)
        p.update(over)
        nz, nx = p.pop("nz"), p.pop("nx")
        if p["oversample_factor"] == 1:
            fine = dict(p, dxy=p["dxy"] / 5)
            psf = psfmodels.make_psf(nz, nx * 5, model="scalar", normalize=True, **fine)[:, 2::5, 2::5]
        else:
            psf = psfmodels.make_psf(nz, nx, model="scalar", normalize=True, **p)
        psf = (psf / psf.sum()).astype(np.float32)
        np.save(OUT / f"psf_{name}.npy", psf)
        entry = {RENAME.get(k, k): v for k, v in p.items()}
        entry.update(nx=nx, nz=nz)
        meta[name] = entry
        print(name, psf.shape, f"{psf.nbytes/1e3:.0f} kB")
    (OUT / "psf_sets.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
