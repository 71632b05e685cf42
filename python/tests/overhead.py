"""The Python calls' overhead against the library, CPU:

    python python/tests/overhead.py MODEL VOLUME.f32 NZ NY NX [RUNS]
        times model.deconvolve on a raw float32 volume (capi/examples/overhead.rs
        times the library's deconvolve on the same file);
    python python/tests/overhead.py MODEL VOLUME.tif [RUNS]
        times rln_engine.infer_file (streamed, TIFF to TIFF) against the library's own
        time in the same call (the summary's "seconds", measured inside
        rln_engine::infer::stream::infer_file): the difference is the binding's cost.
"""

import os
import statistics
import sys
import tempfile
import time

import numpy as np

import rln_engine

model_path, volume_path = sys.argv[1], sys.argv[2]
if volume_path.endswith((".tif", ".tiff")):
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    walls, inside = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(runs):
            out = os.path.join(tmp, f"out{k}.tif")
            t = time.perf_counter()
            s = rln_engine.infer_file(model_path, volume_path, out, device="cpu")
            walls.append(time.perf_counter() - t)
            inside.append(s["seconds"])
            os.remove(out)
    print("infer_file wall runs:", [round(t, 3) for t in walls])
    print("library (summary) runs:", [round(t, 3) for t in inside])
    over = [w - i for w, i in zip(walls, inside)]
    print(f"median: python {statistics.median(walls):.3f} s, library {statistics.median(inside):.3f} s, "
          f"overhead {statistics.median(over) * 1e3:.1f} ms")
    sys.exit(0)
shape = tuple(int(v) for v in sys.argv[3:6])
runs = int(sys.argv[6]) if len(sys.argv) > 6 else 5
model = rln_engine.Model.load(model_path)
vol = np.fromfile(volume_path, dtype="<f4").reshape(shape)
times = []
for _ in range(runs):
    t = time.perf_counter()
    model.deconvolve(vol, device="cpu", tile=(256, 256, 256))
    times.append(time.perf_counter() - t)
print("python runs:", [round(t, 3) for t in times])
print(f"median: python {statistics.median(times):.3f} s")
