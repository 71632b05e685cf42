"""NumPy-only tests of the PyTorch peer (tools/peers/rln_torch.py), runnable without
torch: the fused forward (folded batch norms, concatenation-free convs, scalar BN nodes)
computes the same function as the line-by-line one, and the validity rule.

  target/py-venv/bin/python -m pytest -q tools/peers/test_rln_torch.py
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rln_torch as rt  # noqa: E402


def random_model(seed):
    """Tensors of every layer (canonical names) with BN statistics of realistic scale."""
    rng = np.random.default_rng(seed)
    t = {}
    for name, kind, ci, co, bn in rt.LAYERS:
        if kind == "conv":
            t[name + ".weight"] = (rng.standard_normal((co, ci, 3, 3, 3)) * 1.5 / np.sqrt(27 * ci)).astype(np.float32)
        elif kind == "up":
            t[name + ".weight"] = (rng.standard_normal((ci, co, 2, 2, 2)) * 1.5 / np.sqrt(8 * ci)).astype(np.float32)
        if bn:
            t[name + ".bn.weight"] = rng.uniform(0.5, 1.5, co).astype(np.float32)
            t[name + ".bn.bias"] = rng.uniform(-0.5, 0.5, co).astype(np.float32)
            t[name + ".bn.running_mean"] = rng.uniform(-0.3, 0.3, co).astype(np.float32)
            t[name + ".bn.running_var"] = rng.uniform(0.5, 2.0, co).astype(np.float32)
    return t, {"bn_eps": 1e-3, "div_eps": 1e-4}


def test_fused_forward_equals_the_line_by_line_forward():
    t, cfg = random_model(3)
    x = np.random.default_rng(4).random((1, 1, 6, 8, 10))
    want = rt.rln_forward(x, rt.NumpyOps(t, cfg), cfg["div_eps"])
    P = rt.fold_params(t, cfg)
    got = rt.rln_forward_fused(x, rt.NumpyFusedOps(P, None), P, cfg["div_eps"])
    for name, g, w in zip(("y", "E1r", "E2r"), got, want):
        assert g.shape == w.shape, name
        # float64 everywhere; the folded weights are stored as float32 (rounding ~6e-8)
        e = rt.rel_l2(g, w)
        assert e < 1e-6, (name, e)


def test_odd_sizes_are_padded_and_cropped_the_same():
    t, cfg = random_model(5)
    x = np.random.default_rng(6).random((1, 1, 5, 7, 9))
    P = rt.fold_params(t, cfg)
    got = rt.rln_forward_fused(x, rt.NumpyFusedOps(P, None), P, cfg["div_eps"])[0]
    want = rt.rln_forward(x, rt.NumpyOps(t, cfg), cfg["div_eps"])[0]
    assert got.shape == (1, 1, 5, 7, 9)
    assert rt.rel_l2(got, want) < 1e-6


def test_folding_puts_the_shift_into_the_bias():
    t, cfg = random_model(7)
    P = rt.fold_params(t, cfg)
    name = "h1.fp.conv1"
    s = t[name + ".bn.weight"] / np.sqrt(t[name + ".bn.running_var"].astype(np.float64) + cfg["bn_eps"])
    w, b = P[name]
    np.testing.assert_allclose(w, t[name + ".weight"] * s[:, None, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(b, t[name + ".bn.bias"] - t[name + ".bn.running_mean"] * s, rtol=1e-5, atol=1e-7)
    assert np.all(P["h3.conv1"][1] == 0)  # no batch norm: zero bias
    assert isinstance(P["h1.dv"][0], float)  # one-channel BN nodes: scalars


def test_validity_rule():
    ref = np.linspace(1.0, 2.0, 100)
    assert rt.validity(ref * (1 + 1e-3), ref)[2]
    e, bad, ok = rt.validity(ref * 1.05, ref)
    assert not ok and bad == 0 and abs(e - 0.05) < 1e-9
    y = ref.copy()
    y[3] = np.inf
    e, bad, ok = rt.validity(y, ref)
    assert not ok and bad == 1 and e == float("inf")
