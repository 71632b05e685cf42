#!/usr/bin/env python3
"""average_models.py OUT IN... : uniform average of the tensors of RLN model files (weights
and batch-norm running statistics alike); OUT keeps the metadata (rln_config) of the last IN.
Checkpoint averaging as tried in models/README.md "Fixed normalization" (it did not help
there). Reads the safetensors layout directly, so it needs NumPy only."""
import json, os, struct, sys
import numpy as np
def load(p):
    b = open(p, 'rb').read(); n = struct.unpack('<Q', b[:8])[0]; h = json.loads(b[8:8+n]); data = b[8+n:]
    meta = h.pop('__metadata__', None)
    bad = [k for k, v in h.items() if v['dtype'] != 'F32']
    if bad:
        sys.exit(f'{p}: tensors {bad} are not F32')
    t = {k: np.frombuffer(data[v['data_offsets'][0]:v['data_offsets'][1]], dtype='<f4').reshape(v['shape']) for k, v in h.items()}
    return meta, t
if len(sys.argv) < 3:
    sys.exit(__doc__)
out, ins = sys.argv[1], sys.argv[2:]
if any(os.path.exists(out) and os.path.samefile(out, p) for p in ins):
    sys.exit(f'{out} is one of the inputs: give a new file name')
acc = None
for p in ins:
    meta, t = load(p)
    if acc is not None and set(t) != set(acc):
        sys.exit(f'{p}: tensors differ from the first model')
    acc = {k: v.astype(np.float64) for k, v in t.items()} if acc is None else {k: acc[k] + t[k] for k in acc}
hdr, off, blobs = {}, 0, []
for k in sorted(acc):
    a = (acc[k] / len(ins)).astype('<f4'); bb = a.tobytes()
    hdr[k] = {'dtype': 'F32', 'shape': list(a.shape), 'data_offsets': [off, off + len(bb)]}; off += len(bb); blobs.append(bb)
if meta: hdr['__metadata__'] = meta
hj = json.dumps(hdr).encode(); hj += b' ' * ((8 - len(hj) % 8) % 8)
open(out, 'wb').write(struct.pack('<Q', len(hj)) + hj + b''.join(blobs))
