"""Times model.deconvolve (CPU) on a raw float32 volume, for the Python call's overhead
against the library (capi/examples/overhead.rs times the library on the same file):

    python python/tests/overhead.py MODEL VOLUME.f32 NZ NY NX [RUNS]
"""

import statistics
import sys
import time

import numpy as np

import rln_engine

model_path, volume_path = sys.argv[1], sys.argv[2]
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
