"""rln-engine from Python: Richardson–Lucy Network (RLN) deconvolution of numpy arrays.

    import rln_engine
    model = rln_engine.Model.load("models/rln-synthetic-widefield.safetensors")
    restored = model.deconvolve(stack)          # stack: a z,y,x numpy array

The network runs in Rust (the CPU reference, or CUDA with ``device="cuda"``); the GIL
is released while it computes, so other Python threads keep running. Modules:

- :mod:`rln_engine.psf`: PSF models (``gibson_lanni``).
- :mod:`rln_engine.metrics`: ``ssim`` and ``psnr`` (scikit-image's definitions).
- :mod:`rln_engine.dask`: ``deconvolve`` a dask array block by block (``map_overlap``).

Errors raise ``ValueError`` (bad arrays or arguments), ``FileNotFoundError``/``OSError``
(files), ``RuntimeError`` (CUDA, non-finite results) or ``MemoryError`` (GPU memory).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from . import _rln_engine as _native
from . import metrics, psf  # noqa: F401  (public submodules)

__version__: str = _native.__version__
#: The network's receptive radius in voxels (even): the context a block cut out of a
#: larger volume needs on every inner side to match the whole-volume result.
RECEPTIVE_RADIUS: int = _native.RECEPTIVE_RADIUS
#: Whether this build reads and writes HDF5 (``file.h5:/dataset``) in :func:`infer_file`
#: (``MATURIN_PEP517_ARGS="--features hdf5" pip install ./python``, needs libhdf5-dev).
HDF5: bool = _native.HDF5

PathLike = Union[str, "os.PathLike[str]"]

#: Sample types accepted for volumes (converted to float32, as the engine computes).
ACCEPTED_DTYPES = (np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64)


def as_volume(array, what: str = "the array") -> np.ndarray:
    """The array as a C-contiguous float32 z,y,x volume: no copy when it already is
    one; a ``ValueError`` for a 2D (or 4D) array, a ``TypeError`` for another dtype."""
    a = np.asarray(array)
    if a.ndim != 3:
        shape = "×".join(str(s) for s in a.shape) or "a scalar"
        raise ValueError(
            f"{what} is {a.ndim}D ({shape}); RLN needs a 3D z,y,x stack "
            "(a single plane is a stack of one: array[None])"
        )
    if not any(a.dtype == d for d in ACCEPTED_DTYPES):
        names = ", ".join(np.dtype(d).name for d in ACCEPTED_DTYPES)
        raise TypeError(f"{what} has dtype {a.dtype}; give one of {names}")
    if 0 in a.shape:
        raise ValueError(f"{what} is empty (shape {a.shape})")
    return np.ascontiguousarray(a, dtype=np.float32)


def _tile(tile) -> Optional[Tuple[int, int, int]]:
    if tile is None:
        return None
    t = (int(tile),) * 3 if np.isscalar(tile) else tuple(int(v) for v in tile)
    if len(t) != 3 or min(t) <= 0:
        raise ValueError(f"tile must be one positive size or three (z, y, x), got {tile!r}")
    return t  # type: ignore[return-value]


class Model:
    """An RLN model (a .safetensors file written by ``rln-engine train``)."""

    def __init__(self, native: "_native.NativeModel"):
        self._native = native

    @classmethod
    def load(cls, path: PathLike) -> "Model":
        """Loads a model file; ``FileNotFoundError`` if it does not exist, ``ValueError``
        if it is not an RLN model."""
        return cls(_native.NativeModel.load(os.fspath(path)))

    @property
    def path(self) -> str:
        """The file the model was loaded from."""
        return str(self._native.path)

    @property
    def percentiles(self) -> Tuple[float, float]:
        """The input normalization percentiles (low, high) the model was trained with."""
        return self._native.percentiles

    @property
    def variant(self) -> str:
        """The network variant ("Single", "DualAverage", "DualConcat")."""
        return self._native.variant

    @property
    def provenance(self) -> str:
        """How the model was made (the command that trained it)."""
        return self._native.provenance

    @property
    def receptive_radius(self) -> int:
        """Context (voxels) a block needs on every inner side: :data:`RECEPTIVE_RADIUS`."""
        return RECEPTIVE_RADIUS

    def __repr__(self) -> str:
        return f"rln_engine.Model.load({self.path!r})"

    def __reduce__(self):
        # pickled by path: dask workers load the file themselves, once per process
        return (_load_shared, (self.path,))

    def normalization(self, array) -> Tuple[float, float]:
        """The low and high percentile values of the model's global normalization of
        ``array`` (every voxel). Compute them once on a whole volume (or a strided
        sample of it) and pass them to :meth:`deconvolve` for each block."""
        return self._native.normalization(as_volume(array))

    def deconvolve(
        self,
        array,
        device: str = "auto",
        fp16: bool = False,
        tile: Union[None, int, Sequence[int]] = None,
        normalization: Optional[Tuple[float, float]] = None,
    ) -> np.ndarray:
        """Deconvolves a z,y,x volume; returns float32 of the same shape, in the input's
        intensity range (as ``rln-engine infer``).

        - ``array``: 3D numpy array (or anything ``np.asarray`` takes) of uint8, uint16,
          int16, int32, float32 or float64; a C-contiguous float32 array is used without
          a copy. NaN or infinite voxels raise ``ValueError``.
        - ``device``: ``"auto"`` (CUDA when usable, else the CPU with a warning),
          ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (``RuntimeError`` without a usable GPU).
        - ``fp16``: FP16 storage on the GPU (FP32 accumulation); ignored on the CPU.
        - ``tile``: largest tile core (z, y, x) or one size; default: what memory holds.
          Tiles are blended with context, so the result does not depend on it beyond
          float rounding.
        - ``normalization``: (low, high) percentile values from :meth:`normalization` of
          the whole volume, for blocks of a larger one; default: this array's own.
        """
        vol = as_volume(array)
        if normalization is not None:
            normalization = (float(normalization[0]), float(normalization[1]))
        out, note = self._native.deconvolve(vol, str(device), bool(fp16), _tile(tile), normalization)
        if note:
            warnings.warn(f"rln_engine: {note}", RuntimeWarning, stacklevel=2)
        return out


_shared_models: dict = {}


def _load_shared(path: str) -> Model:
    """The model of ``path``, loaded once per process (unpickling on dask workers, so
    that every block reuses one model and its GPU predictor)."""
    model = _shared_models.get(path)
    if model is None:
        model = _shared_models[path] = Model.load(path)
    return model


def richardson_lucy(array, psf, iterations: int = 50, background: float = 0.0) -> np.ndarray:
    """Classical Richardson–Lucy deconvolution of a z,y,x volume by ``psf`` (3D, centred,
    normalized to unit sum internally) for ``iterations`` iterations with a constant
    ``background``; the same as ``rln-engine rl``. Returns float32."""
    if int(iterations) < 0:
        raise ValueError(f"iterations must be ≥ 0, got {iterations}")
    return _native.richardson_lucy(as_volume(array), as_volume(psf, "the PSF"), int(iterations), float(background))


def _dims_text(keyword: str, value) -> Optional[str]:
    """One size or three (z, y, x) as the command line's "Z,Y,X" (checked in Rust)."""
    if value is None or isinstance(value, str):
        return value
    if np.isscalar(value):
        return str(int(value))
    try:
        return ",".join(str(int(v)) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{keyword} must be one size or three (z, y, x), got {value!r}") from None


def _block_text(block) -> Optional[str]:
    """``"I/N"`` or ``(i, n)`` as ``"I/N"``."""
    if block is None or isinstance(block, str):
        return block
    try:
        i, n = block
        return f"{int(i)}/{int(n)}"
    except (TypeError, ValueError):
        raise ValueError(f"block must be \"I/N\" or (i, n), e.g. \"0/4\" or (0, 4); got {block!r}") from None


def _region_text(region) -> Optional[str]:
    """``"z0:z1,y0:y1,x0:x1"``, three ``(start, end)`` pairs or three slices, as the text."""
    if region is None or isinstance(region, str):
        return region
    try:
        axes = []
        for r in region:
            lo, hi = (r.start, r.stop) if isinstance(r, slice) else r
            axes.append(f"{int(lo)}:{int(hi)}")
    except (TypeError, ValueError):
        axes = []
    if len(axes) != 3:
        raise ValueError(
            "region must be \"z0:z1,y0:y1,x0:x1\" or three (start, end) pairs or slices "
            f"(half-open, z, y, x); got {region!r}"
        )
    return ",".join(axes)


def _memory_text(memory) -> Optional[str]:
    if memory is None or isinstance(memory, str):
        return memory
    if isinstance(memory, (int, np.integer)) and not isinstance(memory, bool):
        return str(int(memory))
    raise ValueError(f"memory must be a size such as \"4G\" or \"512M\", or a number of bytes; got {memory!r}")


def _percentiles_text(percentiles) -> Optional[str]:
    if percentiles is None or isinstance(percentiles, str):
        return percentiles
    try:
        lo, hi = percentiles
        return f"{float(lo)!r},{float(hi)!r}"
    except (TypeError, ValueError):
        raise ValueError(f"percentiles must be (low, high), e.g. (2.0, 99.5); got {percentiles!r}") from None


def infer_file(
    model: Union[Model, PathLike],
    input: PathLike,
    output: PathLike,
    *,
    input2: Optional[PathLike] = None,
    device: str = "auto",
    devices: Optional[Sequence[int]] = None,
    fp16: bool = False,
    memory: Union[None, str, int] = None,
    tile: Union[None, int, str, Sequence[int]] = None,
    overlap: Union[int, str, Sequence[int]] = (10, 24, 24),
    context: int = RECEPTIVE_RADIUS,
    normalize: str = "global",
    percentiles: Union[None, str, Tuple[float, float]] = None,
    norm_stats: Optional[PathLike] = None,
    rescale: bool = True,
    output_dtype: str = "f32",
    chunks: Union[None, int, str, Sequence[int]] = None,
    create_only: bool = False,
    block: Union[None, str, Tuple[int, int]] = None,
    region: Union[None, str, Sequence] = None,
    resume: bool = False,
    channel: Optional[int] = None,
    time: Optional[int] = None,
) -> dict:
    """Deconvolves the volume file ``input`` into ``output`` by streaming it through the
    network: ``rln-engine infer MODEL INPUT -o OUTPUT`` with the same options as
    keywords, the same defaults, and the same result (bit for bit). Memory is bounded by
    ``memory``, not by the volume; the GIL is released while it runs.

    Formats (chosen by name, as ``rln-engine convert``): TIFF/BigTIFF, a folder of 2D
    TIFF slices, OME-Zarr (``*.zarr`` folders; level 0 of a multiscale), and HDF5
    ``file.h5:/dataset`` when built with the ``hdf5`` feature (:data:`HDF5`). A TIFF output is written
    under a temporary name and renamed when complete; an OME-Zarr output is marked
    complete at the end. No output may be an input (``ValueError``).

    Keywords (the CLI's flag in brackets):

    - ``input2``: second view of an RLN-dual model [``--input2``].
    - ``device``: ``"auto"`` (CUDA when usable, else the CPU with a ``RuntimeWarning``),
      ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` [``--device``]; ``devices``: CUDA ordinals
      [``--devices``]; ``fp16``: FP16 storage on the GPU (refused with ``"cpu"``) [``--fp16``].
    - ``memory``: host memory for the tiles in flight, ``"4G"``, ``"512M"`` or bytes
      (default: 4 GiB or half the available RAM) [``--memory``]; ``tile``: largest tile
      core, one size or (z, y, x), at least 16, overriding ``memory`` [``--tile``].
    - ``overlap``, ``context``, ``normalize`` (``"global"`` or ``"per-tile"``),
      ``percentiles`` (low, high): the tiling and normalization [``--overlap``,
      ``--context``, ``--normalize``, ``--percentiles``]; ``norm_stats``: a JSON file of
      global normalization statistics, read if it exists, else written [``--norm-stats``].
    - ``rescale``: map the output back to the input's range (``False``: ``--no-rescale``);
      ``output_dtype``: ``"f32"``, ``"f16"`` or ``"u16"`` [``--output-dtype``];
      ``chunks``: chunk shape of a created OME-Zarr output [``--chunks``].
    - Split jobs into an OME-Zarr store: ``create_only`` [``--create-only``], ``block``
      ``"I/N"`` or ``(i, n)`` [``--block``], ``region`` ``"z0:z1,y0:y1,x0:x1"`` or three
      ``(start, end)`` pairs [``--region``], ``resume`` [``--resume``].
    - ``channel``, ``time``: the channel / time point of a multi-channel or time-lapse
      input [``--channel``, ``--time``].

    Returns the run's summary as a dict (what ``rln-engine infer --json`` prints: dims,
    tiles, core, memory_budget_bytes, predictor, phases, normalization, seconds, ...).
    A bad option raises ``ValueError`` with what is expected; a missing input
    ``FileNotFoundError``.
    """
    path = model.path if isinstance(model, Model) else os.fspath(model)
    summary_json, note = _native.infer_file(
        path,
        os.fspath(input),
        os.fspath(output),
        input2=None if input2 is None else os.fspath(input2),
        device=str(device),
        devices=None if devices is None else [int(d) for d in devices],
        fp16=bool(fp16),
        memory=_memory_text(memory),
        tile=_dims_text("tile", tile),
        overlap=_dims_text("overlap", overlap),
        context=int(context),
        normalize=str(normalize),
        percentiles=_percentiles_text(percentiles),
        norm_stats=None if norm_stats is None else os.fspath(norm_stats),
        rescale=bool(rescale),
        output_dtype=str(output_dtype),
        chunks=_dims_text("chunks", chunks),
        create_only=bool(create_only),
        block=_block_text(block),
        region=_region_text(region),
        resume=bool(resume),
        channel=None if channel is None else int(channel),
        time=None if time is None else int(time),
    )
    if note:
        warnings.warn(f"rln_engine: {note}", RuntimeWarning, stacklevel=2)
    return json.loads(summary_json)


def _flag(name: str, value) -> list:
    flag = "--" + name.replace("_", "-")
    if value is None or value is False:
        return []
    if value is True:
        return [flag]
    if isinstance(value, (list, tuple)):
        return [flag, ",".join(str(v) for v in value)]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return [flag, str(value)]


def train(output: PathLike, **options) -> None:
    """Trains an RLN model into ``output``, exactly as ``rln-engine train -o OUTPUT``
    with the same options given as keywords (dashes become underscores; ``True`` gives
    a bare flag; tuples become comma lists), e.g.::

        rln_engine.train("m.safetensors", synth_psf="psf.tif", steps=2000,
                         crop=(32, 64, 64), device="cuda")

    Writes the same files as the command (checkpoint, log, best model). See
    ``rln-engine train --help`` for every option; an unknown option or a bad value
    raises ``ValueError`` with the command line's message; a failed run raises what the
    other calls raise: ``FileNotFoundError`` (a missing file), ``ValueError`` (bad data),
    ``MemoryError`` (out of memory; the message says which option to lower) or
    ``RuntimeError`` (CUDA, non-finite results)."""
    flags = ["--output", os.fspath(output)]
    for name, value in options.items():
        flags += _flag(name, value)
    call = "rln_engine.train(" + ", ".join([repr(os.fspath(output))] + [f"{k}={v!r}" for k, v in options.items()]) + ")"
    _native.train(flags, call)


def cuda_available() -> bool:
    """Whether a CUDA driver and device are usable."""
    return _native.cuda_available()


def set_threads(n: int) -> None:
    """CPU threads of all later work (0: one per core); only the first call, before any
    computation, takes effect."""
    _native.set_threads(int(n))


def threads() -> int:
    """The number of CPU threads the engine computes on."""
    return _native.threads()


__all__ = [
    "HDF5",
    "Model",
    "RECEPTIVE_RADIUS",
    "as_volume",
    "cuda_available",
    "infer_file",
    "metrics",
    "psf",
    "richardson_lucy",
    "set_threads",
    "threads",
    "train",
]
