#!/usr/bin/env python3
"""average_models.py OUT IN... : uniform average of the tensors of RLN model files (weights
and batch-norm running statistics alike); OUT keeps the metadata (rln_config) of the last IN.
Checkpoint averaging as tried in models/README.md "Fixed normalization" (it did not help
there). Needs the project's venv (tools/install-python-venv.sh: numpy, safetensors)."""
import os
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, ins = sys.argv[1], sys.argv[2:]
    if any(os.path.exists(out) and os.path.samefile(out, p) for p in ins):
        sys.exit(f"{out} is one of the inputs: give a new file name")
    acc, meta = None, None
    for p in ins:
        with safe_open(p, framework="numpy") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        bad = [k for k, v in t.items() if v.dtype != np.float32]
        if bad:
            sys.exit(f"{p}: tensors {bad} are not F32")
        if acc is None:
            acc = {k: v.astype(np.float64) for k, v in t.items()}
        elif set(t) != set(acc):
            sys.exit(f"{p}: tensors differ from the first model's")
        else:
            for k in acc:
                acc[k] += t[k]
    save_file({k: (v / len(ins)).astype(np.float32) for k, v in acc.items()}, out, metadata=meta)


if __name__ == "__main__":
    main()
