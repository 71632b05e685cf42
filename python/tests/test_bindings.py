"""rln_engine from Python against the rln-engine CLI on the same volumes, and its
errors, device choice, GIL release and copies."""

import pickle
import subprocess
import threading
import time
import warnings

import numpy as np
import pytest
import tifffile

import rln_engine
from conftest import max_rel_diff, widefield_volume


def run(cli, *args):
    done = subprocess.run([cli, *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def model(model_path):
    return rln_engine.Model.load(model_path)


def test_deconvolve_equals_the_cli(tmp_path, cli, model, model_path, volume):
    tifffile.imwrite(tmp_path / "in.tif", volume)
    run(cli, "infer", model_path, tmp_path / "in.tif", "-o", tmp_path / "out.tif", "--device", "cpu")
    expected = tifffile.imread(tmp_path / "out.tif")
    got = model.deconvolve(volume, device="cpu")
    assert got.dtype == np.float32 and got.shape == volume.shape
    diff = max_rel_diff(got, expected)
    print(f"Python vs CLI on {volume.shape}: max |diff| / range = {diff:.2e}")
    assert diff <= 1e-6
    # uint16 input gives the same as its float32 values; small tiles agree up to rounding
    u16 = volume.astype(np.uint16)
    assert np.array_equal(model.deconvolve(u16, device="cpu"), model.deconvolve(u16.astype(np.float32), device="cpu"))
    assert max_rel_diff(model.deconvolve(volume, device="cpu", tile=(12, 48, 48)), expected) <= 1e-4
    # and the result is a deconvolution (sharper than the input), not a copy
    assert max_rel_diff(got, volume) > 0.05


def test_bad_arrays_raise_clear_errors(model):
    with pytest.raises(ValueError, match=r"2D \(64×64\).*3D"):
        model.deconvolve(np.zeros((64, 64), np.float32))
    with pytest.raises(TypeError, match="dtype complex64"):
        model.deconvolve(np.zeros((8, 32, 32), np.complex64))
    with pytest.raises(TypeError, match="dtype bool"):
        model.deconvolve(np.zeros((8, 32, 32), bool))
    bad = np.ones((8, 32, 32), np.float32)
    bad[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        model.deconvolve(bad, device="cpu")
    with pytest.raises(ValueError, match="non-finite"):
        model.deconvolve(bad, device="cpu", normalization=(0.0, 1.0))
    with pytest.raises(ValueError, match="empty"):
        model.deconvolve(np.zeros((0, 32, 32), np.float32))
    with pytest.raises(ValueError, match="unknown device"):
        model.deconvolve(np.ones((8, 32, 32), np.float32), device="tpu")
    with pytest.raises(ValueError, match="tile"):
        model.deconvolve(np.ones((8, 32, 32), np.float32), tile=(0, 8, 8))
    with pytest.raises(FileNotFoundError, match="no-such.safetensors"):
        rln_engine.Model.load("no-such.safetensors")


def test_gpu_without_gpu_raises_and_auto_falls_back(model):
    vol = widefield_volume((8, 32, 32), seed=1)
    if rln_engine.cuda_available():
        pytest.skip("SKIP: a CUDA device is present; the no-GPU paths cannot be exercised here")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        model.deconvolve(vol, device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        model.deconvolve(vol, device="cuda:1", fp16=True)
    with pytest.warns(RuntimeWarning, match="running on the CPU"):
        auto = model.deconvolve(vol, device="auto")
    assert np.array_equal(auto, model.deconvolve(vol, device="cpu"))


def test_gil_is_released_while_computing(model):
    vol = widefield_volume((64, 128, 128), seed=2)  # > 0.2 s of compute even on a fast idle machine
    gaps, done = [], threading.Event()

    def work():
        t0 = time.perf_counter()
        model.deconvolve(vol, device="cpu")
        gaps.append(("call", time.perf_counter() - t0))
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    last, widest = time.perf_counter(), 0.0
    while not done.is_set():  # this loop needs the GIL to advance
        time.sleep(0.001)
        now = time.perf_counter()
        widest, last = max(widest, now - last), now
    worker.join()
    call = gaps[0][1]
    print(f"deconvolve took {call:.2f} s; the main thread's longest wait for the GIL {widest * 1e3:.0f} ms")
    assert call > 0.2, "the volume is too small to tell"
    assert widest < 0.25 * call, "the main thread was blocked during deconvolve: the GIL was held"


def test_no_copy_for_contiguous_float32_input():
    a = np.ones((4, 8, 8), np.float32)
    assert rln_engine.as_volume(a) is a
    assert rln_engine.as_volume(a[:, ::2]) is not a  # a strided view is made contiguous
    assert rln_engine.as_volume(a[:, ::2]).flags.c_contiguous


def test_model_properties_and_pickle(model, model_path):
    assert model.percentiles[0] < model.percentiles[1]
    assert model.variant == "Single"
    assert model.receptive_radius == rln_engine.RECEPTIVE_RADIUS == 18
    again = pickle.loads(pickle.dumps(model))
    assert again.path == str(model_path)


def test_richardson_lucy_and_psf_equal_the_cli(tmp_path, cli):
    psf = rln_engine.psf.gibson_lanni(na=1.4, wavelength=0.52, ni=1.515, ns=1.47, dxy=0.1, dz=0.2, nx=33, nz=17)
    run(cli, "psf", "--model", "gibson-lanni", "--na", 1.4, "--wavelength", 0.52, "--ni", 1.515, "--ns", 1.47,
        "--dxy", 0.1, "--dz", 0.2, "--nx", 33, "--nz", 17, "-o", tmp_path / "psf.tif")
    cli_psf = tifffile.imread(tmp_path / "psf.tif")
    assert psf.shape == (17, 33, 33)
    assert abs(psf.sum() - 1) < 1e-5
    assert max_rel_diff(psf, cli_psf) <= 1e-6

    vol = widefield_volume((24, 48, 48), seed=3)
    tifffile.imwrite(tmp_path / "in.tif", vol)
    run(cli, "rl", tmp_path / "in.tif", "--psf", tmp_path / "psf.tif", "--iterations", 8, "--background", 30,
        "-o", tmp_path / "rl.tif")
    got = rln_engine.richardson_lucy(vol, psf, iterations=8, background=30)
    diff = max_rel_diff(got, tifffile.imread(tmp_path / "rl.tif"))
    assert diff <= 1e-6, diff
    with pytest.raises(ValueError, match="3D"):
        rln_engine.richardson_lucy(vol[0], psf, 3)
    with pytest.raises(ValueError, match="must be positive"):
        rln_engine.psf.gibson_lanni(nx=0)


def test_metrics_equal_the_cli(tmp_path, cli, volume, model):
    gt = widefield_volume((16, 48, 48), seed=4)
    pred = gt + np.random.default_rng(5).normal(0, 20, gt.shape).astype(np.float32)
    tifffile.imwrite(tmp_path / "gt.tif", gt)
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    out = run(cli, "eval", tmp_path / "gt.tif", tmp_path / "pred.tif", "--normalize", "none", "--json").stdout
    import json

    m = json.loads(out)
    assert rln_engine.metrics.psnr(gt, pred) == pytest.approx(m["psnr"], rel=1e-9)
    assert rln_engine.metrics.ssim(gt, pred) == pytest.approx(m["ssim"], rel=1e-9)
    assert rln_engine.metrics.psnr(gt, gt + 1, data_range=100) == pytest.approx(40.0, rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        rln_engine.metrics.ssim(gt, pred[1:])


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


#: summary fields that time the run or name its files (the rest must equal the CLI's)
RUN_SPECIFIC = {"input", "output", "seconds", "voxels_per_s", "phases", "normalization_seconds", "peak_rss_bytes"}


def test_infer_file_streams_like_the_cli(tmp_path, cli, model, model_path, volume):
    tifffile.imwrite(tmp_path / "in.tif", volume)
    summary = rln_engine.infer_file(model, tmp_path / "in.tif", tmp_path / "out.tif", device="cpu")
    run(cli, "infer", model_path, tmp_path / "in.tif", "-o", tmp_path / "cli.tif", "--device", "cpu")
    got = tifffile.imread(tmp_path / "out.tif")
    assert got.dtype == np.float32 and got.shape == volume.shape
    assert np.array_equal(got, tifffile.imread(tmp_path / "cli.tif")), "infer_file differs from `rln-engine infer`"
    reference = model.deconvolve(volume, device="cpu")
    print(f"infer_file vs deconvolve on {volume.shape}: rel L2 {rel_l2(got, reference):.2e}")
    assert rel_l2(got, reference) <= 1e-6
    assert rel_l2(got, volume) > 0.05  # a deconvolution, not a copy
    assert summary["dims"] == list(volume.shape)
    assert summary["tiling"] == "cores" and summary["tiles"] == summary["tiles_total"] >= 1
    assert summary["voxels"] == volume.size and summary["predictor"].startswith("CPU")
    # refusals: the input as output, a missing input; nothing is left behind (no lock)
    with pytest.raises(ValueError, match="is the input"):
        rln_engine.infer_file(model, tmp_path / "in.tif", tmp_path / "in.tif", device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        rln_engine.infer_file(model, tmp_path / "missing.tif", tmp_path / "x.tif", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.tif", "in.tif", "out.tif"]


def test_infer_file_options_equal_the_cli_flags(tmp_path, cli, model_path, volume):
    """Each keyword maps to its flag: the output (bit for bit), the summary and the
    normalization statistics equal the CLI's with the same flags."""
    tifffile.imwrite(tmp_path / "in.tif", volume)
    py = rln_engine.infer_file(
        model_path, tmp_path / "in.tif", tmp_path / "py.tif", device="cpu", memory="64M", tile=(16, 48, 48),
        context=20, percentiles=(1.0, 99.0), norm_stats=tmp_path / "py-stats.json",
        output_dtype="f16",
    )
    out = run(cli, "infer", model_path, tmp_path / "in.tif", "-o", tmp_path / "cli.tif", "--device", "cpu",
              "--memory", "64M", "--tile", "16,48,48", "--context", 20,
              "--percentiles", "1,99", "--norm-stats", tmp_path / "cli-stats.json", "--output-dtype", "f16",
              "--json").stdout
    import json

    want = json.loads(out)
    got = tifffile.imread(tmp_path / "py.tif")
    assert got.dtype == np.float16
    assert np.array_equal(got, tifffile.imread(tmp_path / "cli.tif"))
    assert {k: v for k, v in py.items() if k not in RUN_SPECIFIC} == {k: v for k, v in want.items() if k not in RUN_SPECIFIC}
    assert py["memory_budget_bytes"] == 64 << 20 and py["context"] == 20 and py["tiles_total"] > 1
    assert json.loads((tmp_path / "py-stats.json").read_text()) == json.loads((tmp_path / "cli-stats.json").read_text())
    # the authors' blended tiling (per-tile normalization, overlapping cores) without rescaling
    py = rln_engine.infer_file(model_path, tmp_path / "in.tif", tmp_path / "py2.tif", device="cpu", tile=32,
                               overlap=(4, 8, 8), normalize="per-tile", rescale=False)
    run(cli, "infer", model_path, tmp_path / "in.tif", "-o", tmp_path / "cli2.tif", "--device", "cpu", "--tile", 32,
        "--overlap", "4,8,8", "--normalize", "per-tile", "--no-rescale")
    assert py["tiling"] != "cores"
    assert np.array_equal(tifffile.imread(tmp_path / "py2.tif"), tifffile.imread(tmp_path / "cli2.tif"))


def test_infer_file_into_ome_zarr_and_split_jobs(tmp_path, model, volume):
    zarr = pytest.importorskip("zarr")
    zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=volume.shape, chunks=(12, 48, 48), dtype="f4")[...] = volume
    opts = dict(device="cpu", tile=(16, 48, 48), chunks=(8, 48, 48))
    full = rln_engine.infer_file(model, tmp_path / "in.zarr", tmp_path / "out.ome.zarr", **opts)
    assert full["complete"] and full["format_out"] == full["format_in"]
    got = zarr.open_group(str(tmp_path / "out.ome.zarr"), mode="r")["0"][...]
    assert got.dtype == np.float32 and got.shape == volume.shape
    assert rel_l2(got, model.deconvolve(volume, device="cpu")) <= 1e-6
    # a split job: create the store, then its blocks in any order, as on a cluster
    created = rln_engine.infer_file(model, tmp_path / "in.zarr", tmp_path / "split.zarr", create_only=True,
                                    norm_stats=tmp_path / "stats.json", **opts)
    assert created["tiles"] == 0 and created["tiles_total"] == full["tiles_total"] > 2
    assert (tmp_path / "stats.json").is_file()
    for block in ["2/3", (0, 3), "1/3"]:
        rln_engine.infer_file(model, tmp_path / "in.zarr", tmp_path / "split.zarr", block=block,
                              norm_stats=tmp_path / "stats.json", **opts)
    assert np.array_equal(zarr.open_group(str(tmp_path / "split.zarr"), mode="r")["0"][...], got)
    # a region, and resume of a finished block (nothing to do)
    again = rln_engine.infer_file(model, tmp_path / "in.zarr", tmp_path / "split.zarr", region=((0, 8), (0, 48), (0, 48)),
                                  **opts)
    assert again["tiles"] == 1
    done = rln_engine.infer_file(model, tmp_path / "in.zarr", tmp_path / "split.zarr", block="1/3", resume=True, **opts)
    assert done["tiles"] == 0
    assert np.array_equal(zarr.open_group(str(tmp_path / "split.zarr"), mode="r")["0"][...], got)


def test_infer_file_reads_slice_folders_and_hdf5(tmp_path, model_path):
    vol = widefield_volume((12, 40, 40), seed=8)
    tifffile.imwrite(tmp_path / "stack.tif", vol)
    (tmp_path / "slices").mkdir()
    for z, plane in enumerate(vol):
        tifffile.imwrite(tmp_path / "slices" / f"z{z:03d}.tif", plane)
    rln_engine.infer_file(model_path, tmp_path / "stack.tif", tmp_path / "a.tif", device="cpu")
    s = rln_engine.infer_file(model_path, tmp_path / "slices", tmp_path / "b.tif", device="cpu")
    assert s["format_in"] == "slices"
    expected = tifffile.imread(tmp_path / "a.tif")
    assert np.array_equal(tifffile.imread(tmp_path / "b.tif"), expected)
    if not rln_engine.HDF5:
        with pytest.raises(ValueError, match="no HDF5 support"):
            rln_engine.infer_file(model_path, tmp_path / "stack.tif", tmp_path / "c.h5", device="cpu")
        pytest.skip("SKIP (HDF5 part): built without the hdf5 feature")
    # an HDF5 output holds what the TIFF output holds: deconvolving either again is equal
    s = rln_engine.infer_file(model_path, tmp_path / "stack.tif", f"{tmp_path / 'c.h5'}:/restored", device="cpu")
    assert s["format_out"] == "hdf5"
    rln_engine.infer_file(model_path, f"{tmp_path / 'c.h5'}:/restored", tmp_path / "again-h5.tif", device="cpu")
    rln_engine.infer_file(model_path, tmp_path / "a.tif", tmp_path / "again-tif.tif", device="cpu")
    assert np.array_equal(tifffile.imread(tmp_path / "again-h5.tif"), tifffile.imread(tmp_path / "again-tif.tif"))


def test_infer_file_bad_options_raise_clear_errors(tmp_path, model, capfd):
    vol = widefield_volume((8, 32, 32), seed=7)
    tifffile.imwrite(tmp_path / "in.tif", vol)
    bad = [
        (dict(memory="abc"), r'memory="abc": "abc" is not a size \(e\.g\. 8G, 512M\)'),
        (dict(memory=-5), r'memory="-5": .*must be positive'),
        (dict(block="3/2"), r'block="3/2": .*block index must satisfy 0 ≤ I < N'),
        (dict(block="x"), r'block="x": .*a block is I/N'),
        (dict(region="0:8,0:10"), r"region=.*a region is z0:z1,y0:y1,x0:x1"),
        (dict(region=((0, 8), (0, 8))), r"region must be"),
        (dict(tile=(8, 48, 48)), r"tile core size must be at least 16"),
        (dict(tile="a,b"), r'tile="a,b"'),
        (dict(percentiles=(99.0, 1.0)), r"percentiles"),
        (dict(normalize="local"), r'normalize="local": give "global" or "per-tile"'),
        (dict(output_dtype="f64"), r"f64"),
        (dict(device="tpu"), r"unknown device"),
        (dict(device="cpu", fp16=True), r"fp16.*GPU"),
        (dict(device="cpu", devices=[0]), r"devices= names CUDA devices"),
        (dict(block=(0, 2)), r"chunked store.*is not one"),
    ]
    for opts, message in bad:
        with pytest.raises(ValueError, match=message):
            rln_engine.infer_file(model, tmp_path / "in.tif", tmp_path / "out.tif", **{"device": "cpu", **opts})
    with pytest.raises(ValueError, match="does not exist: create it first"):
        rln_engine.infer_file(model, tmp_path / "in.tif", tmp_path / "out.zarr", device="cpu", block="0/2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"], "a refused call left files behind"
    if not rln_engine.cuda_available():
        capfd.readouterr()
        with pytest.warns(RuntimeWarning, match="running on the CPU") as caught:
            s = rln_engine.infer_file(model, tmp_path / "in.tif", tmp_path / "auto.tif")
        assert s["predictor"].startswith("CPU")
        # the fallback is said once, as the warning: not also printed by the library
        assert sum("running on the CPU" in str(w.message) for w in caught) == 1
        assert "running on the CPU" not in capfd.readouterr().err


def test_train_equals_the_cli(tmp_path, cli):
    psf = rln_engine.psf.gibson_lanni(wavelength=0.52, dxy=0.1, dz=0.2, nx=17, nz=9, oversample=1)
    tifffile.imwrite(tmp_path / "psf.tif", psf)
    opts = dict(synth_psf=tmp_path / "psf.tif", synth_count=1, synth_val_count=0, synth_size=(24, 32, 32),
                crop=(16, 16, 16), batch=1, steps=2, epoch_steps=2, seed=3)
    rln_engine.train(tmp_path / "py.safetensors", **opts)
    run(cli, "train", "--synth-psf", tmp_path / "psf.tif", "--synth-count", 1, "--synth-val-count", 0,
        "--synth-size", "24,32,32", "--crop", "16,16,16", "--batch", 1, "--steps", 2, "--epoch-steps", 2,
        "--seed", 3, "-o", tmp_path / "cli.safetensors")
    py_model = rln_engine.Model.load(tmp_path / "py.safetensors")
    cli_model = rln_engine.Model.load(tmp_path / "cli.safetensors")
    assert "rln_engine.train(" in py_model.provenance
    vol = widefield_volume((8, 32, 32), seed=6)
    a, b = py_model.deconvolve(vol, device="cpu"), cli_model.deconvolve(vol, device="cpu")
    assert np.array_equal(a, b), "the Python-trained model differs from the CLI's"
    with pytest.raises(ValueError, match="unexpected argument"):
        rln_engine.train(tmp_path / "x.safetensors", synth_psf=tmp_path / "psf.tif", no_such_option=3)
    # a failed run raises the package's usual exception types (the library's error kinds)
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        rln_engine.train(tmp_path / "y.safetensors", synth_psf=tmp_path / "missing.tif", steps=1)
