"""Shared fixtures of the Python tests: the repository, the shipped model, the CLI
binary the bindings are compared against, and a small synthetic widefield volume."""

import os
import pathlib
import shutil

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "rln-synthetic-widefield.safetensors"


@pytest.fixture(scope="session")
def model_path() -> pathlib.Path:
    assert MODEL.exists(), f"{MODEL} is missing (it is part of the repository)"
    return MODEL


@pytest.fixture(scope="session")
def cli() -> str:
    """The rln-engine binary ($RLN_ENGINE_BIN, else target/release/rln-engine)."""
    path = os.environ.get("RLN_ENGINE_BIN") or str(REPO / "target" / "release" / "rln-engine")
    if not (os.path.exists(path) or shutil.which(path)):
        pytest.skip(f"SKIP: no rln-engine binary at {path}: run `cargo build --release` (tools/python-test.sh does)")
    return path


def widefield_volume(shape=(24, 96, 96), seed=0) -> np.ndarray:
    """Sparse bright spots and a few rods on a background, blurred by a Gaussian and
    Poisson-noised: camera counts as float32."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=np.float32)
    scene = np.zeros(shape, np.float32)
    for _ in range(40):
        c = rng.uniform(0, 1, 3) * np.array(shape)
        r2 = ((z - c[0]) / 1.5) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2
        scene += rng.uniform(200, 900) * np.exp(-r2 / 2.0)
    for _ in range(4):
        zc, yc = rng.uniform(0.2, 0.8) * shape[0], rng.uniform(0, shape[1])
        scene += 300 * np.exp(-(((z - zc) / 1.5) ** 2 + (y - yc) ** 2) / 2.0)
    blurred = np.fft.irfftn(
        np.fft.rfftn(scene) * np.fft.rfftn(np.fft.ifftshift(_gaussian(shape, (2.5, 1.5, 1.5)))), s=shape, axes=(0, 1, 2)
    )
    return rng.poisson(np.clip(blurred, 0, None) + 30.0).astype(np.float32)


def _gaussian(shape, sigma):
    grids = np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij")
    g = np.exp(-sum((a / s) ** 2 for a, s in zip(grids, sigma)) / 2.0)
    return (g / g.sum()).astype(np.float32)


@pytest.fixture(scope="session")
def volume() -> np.ndarray:
    return widefield_volume()


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| over the range of b."""
    return float(np.max(np.abs(a.astype(np.float64) - b)) / (b.max() - b.min()))
