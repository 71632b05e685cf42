"""rln_engine.dask.deconvolve on a Zarr-backed dask array, computed by a
dask.distributed LocalCluster (2 worker processes), against model.deconvolve of the
whole volume in this process."""

import numpy as np
import pytest

import rln_engine
import rln_engine.dask
from conftest import max_rel_diff

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")


def test_even_chunk_boundaries():
    even = rln_engine.dask._even_chunks(((24,), (48, 48), (33, 33, 30), (1, 1, 1, 1)))
    assert even == ((24,), (48, 48), (34, 32, 30), (2, 2))


def test_dask_on_a_local_cluster_equals_the_whole_volume(tmp_path, model_path, volume):
    model = rln_engine.Model.load(model_path)
    store = tmp_path / "raw.zarr"
    da.from_array(volume, chunks=(24, 48, 48)).to_zarr(str(store))
    raw = da.from_zarr(str(store))
    assert raw.chunks == ((24,), (48, 48), (48, 48))

    expected = model.deconvolve(volume, device="cpu")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster):
            lazy = rln_engine.dask.deconvolve(raw, model, device="cpu")
            assert lazy.shape == volume.shape and lazy.dtype == np.float32
            got = lazy.compute()
    diff = max_rel_diff(got, expected)
    print(f"dask (4 blocks of 24×48×48, depth {rln_engine.RECEPTIVE_RADIUS}) vs whole volume: max |diff| / range = {diff:.2e}")
    assert diff <= 1e-5

    # blocks normalized by their own percentiles would differ: the global normalization matters
    own = da.map_overlap(lambda b: model.deconvolve(b, device="cpu"), raw, depth=18, boundary="none",
                         dtype=np.float32).compute(scheduler="synchronous")
    assert max_rel_diff(own, expected) > 1e-3


def test_dask_rejects_2d(model_path):
    model = rln_engine.Model.load(model_path)
    with pytest.raises(ValueError, match="3D"):
        rln_engine.dask.deconvolve(da.zeros((64, 64), chunks=32), model)
