"""RLN deconvolution of dask arrays (e.g. a Zarr store opened with ``dask.array.from_zarr``),
block by block, on whatever scheduler dask runs: threads, processes, or a
``dask.distributed`` cluster.

    import dask.array as da, rln_engine, rln_engine.dask
    model = rln_engine.Model.load("model.safetensors")
    raw = da.from_zarr("raw.zarr")
    restored = rln_engine.dask.deconvolve(raw, model)      # lazy
    restored.to_zarr("restored.zarr")

Each block is deconvolved with :data:`rln_engine.RECEPTIVE_RADIUS` voxels of context
from its neighbours (``map_overlap``) and one global normalization computed once from
the whole array, so the result equals ``model.deconvolve`` on the whole volume (up to
float rounding, ~1e-6 relative).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from . import RECEPTIVE_RADIUS, Model

#: The most voxels read to estimate the global normalization; larger arrays are
#: subsampled by a regular stride per axis.
NORMALIZATION_SAMPLE_VOXELS = 64 << 20


def global_normalization(array, model: Model, max_voxels: int = NORMALIZATION_SAMPLE_VOXELS) -> Tuple[float, float]:
    """The model's (low, high) percentile values over the whole dask array (over a
    strided subsample of at most ``max_voxels`` voxels when it is larger)."""
    step = 1
    while np.prod([-(-s // step) for s in array.shape]) > max_voxels:
        step += 1
    sample = array[::step, ::step, ::step] if step > 1 else array
    return model.normalization(np.asarray(sample.compute() if hasattr(sample, "compute") else sample))


def _even_chunks(chunks: Tuple[Tuple[int, ...], ...]) -> Tuple[Tuple[int, ...], ...]:
    """Chunks whose starts are all even: the half-resolution part of the network pools
    voxel pairs, and a block starting on an odd voxel would pair them differently from
    the whole volume. Odd inner boundaries move one voxel up."""
    out = []
    for axis in chunks:
        total = sum(axis)
        bounds = sorted({b + (b % 2) for b in np.cumsum(axis)[:-1].tolist()} - {0, total})
        bounds = [b for b in bounds if b < total]
        edges = [0] + bounds + [total]
        out.append(tuple(int(b - a) for a, b in zip(edges, edges[1:])))
    return tuple(out)


def deconvolve(
    array,
    model: Model,
    device: str = "auto",
    fp16: bool = False,
    tile=None,
    normalization: Optional[Tuple[float, float]] = None,
):
    """Lazily deconvolves a 3D dask array with ``model``: a float32 dask array of the
    same shape and chunks (chunk boundaries moved to even positions where needed).

    - ``normalization``: (low, high) percentile values; default
      :func:`global_normalization` of ``array``, computed now (one pass over the data).
    - ``device``, ``fp16``, ``tile``: as :meth:`rln_engine.Model.deconvolve`, per block
      (each worker opens its own device; ``device="auto"`` falls back to the CPU where a
      worker has no GPU).

    The model is sent to the workers by its file path, which they must be able to read.
    """
    import dask.array as da

    if not isinstance(array, da.Array):
        array = da.from_array(np.asarray(array))
    if array.ndim != 3:
        raise ValueError(f"the array is {array.ndim}D {array.shape}; RLN needs a 3D z,y,x stack")
    if normalization is None:
        normalization = global_normalization(array, model)
    lo, hi = float(normalization[0]), float(normalization[1])
    chunks = _even_chunks(array.chunks)
    if chunks != array.chunks:
        array = array.rechunk(chunks)
    depth = {axis: min(RECEPTIVE_RADIUS, array.shape[axis]) for axis in range(3)}

    def block(x: np.ndarray) -> np.ndarray:
        return model.deconvolve(x, device=device, fp16=fp16, tile=tile, normalization=(lo, hi))

    return da.map_overlap(
        block,
        array,
        depth=depth,
        boundary="none",
        trim=True,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )
