"""Type stubs of the native extension (python/src/lib.rs). Users call the wrappers in
rln_engine, rln_engine.psf, rln_engine.metrics and rln_engine.dask instead: these take
C-contiguous float32 z,y,x arrays only."""

from os import PathLike
from typing import Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str
RECEPTIVE_RADIUS: int
HDF5: bool

_F32 = npt.NDArray[np.float32]

class NativeModel:
    @staticmethod
    def load(path: Union[str, PathLike[str]]) -> NativeModel: ...
    @property
    def path(self) -> str: ...
    @property
    def percentiles(self) -> Tuple[float, float]: ...
    @property
    def variant(self) -> str: ...
    @property
    def provenance(self) -> str: ...
    def normalization(self, array: _F32) -> Tuple[float, float]: ...
    def deconvolve(
        self,
        array: _F32,
        device: str,
        fp16: bool,
        tile: Optional[Tuple[int, int, int]],
        normalization: Optional[Tuple[float, float]],
    ) -> Tuple[_F32, Optional[str]]: ...

def richardson_lucy(array: _F32, psf: _F32, iterations: int, background: float) -> _F32: ...
def gibson_lanni(params_json: str) -> _F32: ...
def ssim(gt: _F32, pred: _F32, data_range: Optional[float] = None) -> float: ...
def psnr(gt: _F32, pred: _F32, data_range: Optional[float] = None) -> float: ...
def train(flags: list[str], command_line: str) -> None: ...
def infer_file(
    model_path: str,
    input: str,
    output: str,
    *,
    input2: Optional[str],
    device: str,
    devices: Optional[list[int]],
    fp16: bool,
    memory: Optional[str],
    tile: Optional[str],
    overlap: str,
    context: int,
    normalize: str,
    percentiles: Optional[str],
    norm_stats: Optional[str],
    rescale: bool,
    output_dtype: str,
    chunks: Optional[str],
    create_only: bool,
    block: Optional[str],
    region: Optional[str],
    resume: bool,
    channel: Optional[int],
    time: Optional[int],
) -> Tuple[str, Optional[str]]:
    """rln-engine infer with the CLI's options as text; returns (summary JSON, note)."""
    ...
def cuda_available() -> bool: ...
def set_threads(n: int) -> None: ...
def threads() -> int: ...
