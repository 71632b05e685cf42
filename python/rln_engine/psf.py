"""Point spread functions (the models of ``rln-engine psf``), as float32 z,y,x arrays
of unit sum."""

from __future__ import annotations

import json

import numpy as np

from . import _rln_engine as _native


def gibson_lanni(
    na: float = 1.4,
    wavelength: float = 0.6,
    ns: float = 1.47,
    ni: float = 1.515,
    ni0: float = 1.515,
    ng: float = 1.515,
    ng0: float = 1.515,
    tg: float = 170.0,
    tg0: float = 170.0,
    ti0: float = 150.0,
    pz: float = 0.0,
    dxy: float = 0.05,
    dz: float = 0.05,
    nx: int = 51,
    nz: int = 51,
    oversample: int = 3,
) -> np.ndarray:
    """The Gibson–Lanni scalar widefield PSF: ``nz`` planes of ``nx`` × ``nx`` voxels
    (``dz`` and ``dxy`` µm), unit sum, centred. Names, units (µm) and defaults are those
    of ``psfmodels.make_psf``: numerical aperture ``na``, emission ``wavelength``;
    refractive indices of the sample ``ns``, the immersion medium ``ni`` (design
    ``ni0``) and the coverslip ``ng`` (``ng0``); coverslip thickness ``tg`` (``tg0``),
    working distance ``ti0``, source depth ``pz``; ``oversample`` sub-pixels per pixel
    and axis. Invalid optics raise ``ValueError``."""
    params = dict(
        na=float(na), wavelength=float(wavelength), ns=float(ns), ni=float(ni), ni0=float(ni0),
        ng=float(ng), ng0=float(ng0), tg=float(tg), tg0=float(tg0), ti0=float(ti0), pz=float(pz),
        dxy=float(dxy), dz=float(dz), nx=int(nx), nz=int(nz), oversample=int(oversample),
    )
    for k in ("nx", "nz", "oversample"):
        if params[k] <= 0:
            raise ValueError(f"{k} must be positive, got {params[k]}")
    return _native.gibson_lanni(json.dumps(params))
