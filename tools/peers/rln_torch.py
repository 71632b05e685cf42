#!/usr/bin/env python3
"""The PyTorch peer of rln-engine: RLN (rln-spec.md section 3) in PyTorch, on rln-engine's
own model file (canonical names, engine layouts: conv [out, in, 3, 3, 3], transposed conv
[in, out, 2, 2, 2]; div_eps and bn_eps from the `rln_config` JSON in the metadata).

The network is written once, `rln_forward`, against a small set of primitives (conv3,
up2, pool2, bn, sp, cat, cm); `TorchOps` supplies them with torch.nn.functional, and
`NumpyOps` in float64 so that the network can be checked against the engine's CPU output
on a machine without PyTorch (--backend numpy).

Inference runs `rln_forward_fused` (the peer at its strongest; `--unfused` runs the
line-by-line `rln_forward` instead): every batch norm folded into its conv's weights and
bias, the one-channel BN nodes as scalar affine maps (no batch_norm calls), no
concatenation copies (a conv over a channel list is the sum of convs over its parts,
and cm(sp(z) + c) = cm(sp(z)) + c), the RL division and update in float32 under autocast.

Modes (one per run; tools/gpu-check.sh runs each under its own timeout):
  eager         float32, TF32 disabled (true FP32), NCDHW
  amp           torch.autocast float16, channels_last_3d, cudnn.benchmark
  amp_bf16      the same with bfloat16
  compile       amp + torch.compile(mode="max-autotune") (Inductor autotuning and CUDA graphs)
  compile_bf16  amp_bf16 + the same
  trt           TensorRT (torch_tensorrt, fp16 kernels allowed) when importable
Each run's JSON carries `rel_err` (against the engine's CPU f32 prediction, y_cpu of
--check) and `valid`: finite and rel_err <= 1e-2 (VALID_REL_ERR); an invalid peer is
reported but never used in a ratio (tools/gpu_summary.py).

  rln_torch.py --model m.safetensors --mode amp --dims 1,256,256,256 --json t.json
  rln_torch.py --model m.safetensors --mode eager --check pred.safetensors --json c.json
  rln_torch.py --model m.safetensors --backend numpy --check pred.safetensors
  rln_torch.py --model chk.safetensors --train --mode eager --dims 4,64,64,64 --check chk.safetensors --json t.json

--train times training steps instead (forward with batch statistics, the loss of
rln-spec section 5, the paper-mode custom gradients as autograd Functions, Adam); its
--check compares the eager FP32 gradients with those in a `gpu_tool train-bench
--check-out` file (the engine's GPU gradients of the same model and batch).

--check reads a file written by `gpu_tool predict` (x, y_cpu, y_f32, y_f16, y_f16_tc)
and reports the relative L2 error of this peer's prediction against each.
Timing: CUDA events around each forward pass after warm-up, median of --reps.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np

# rln-spec.md section 4: (canonical name, kind, c_in, c_out, has batch norm)
LAYERS = [
    ("h1.fp.conv1", "conv", 1, 4, True),
    ("h1.fp.conv2", "conv", 4, 4, True),
    ("h1.fp.conv3", "conv", 8, 4, True),
    ("h1.dv", "bn", 1, 1, True),
    ("h1.bp.conv1", "conv", 1, 8, True),
    ("h1.bp.conv2", "conv", 8, 8, True),
    ("h1.bp.conv3", "conv", 16, 8, True),
    ("h1.bp.up", "up", 8, 4, True),
    ("h1.bp.conv4", "conv", 4, 4, True),
    ("h1.e", "bn", 1, 1, True),
    ("h2.fp.conv1", "conv", 1, 4, True),
    ("h2.fp.conv2", "conv", 4, 4, True),
    ("h2.dv", "bn", 1, 1, True),
    ("h2.bp.conv1", "conv", 1, 8, True),
    ("h2.bp.conv2", "conv", 8, 8, True),
    ("h2.e", "bn", 1, 1, True),
    ("h3.conv1", "conv", 1, 8, False),
    ("h3.conv2", "conv", 10, 8, False),
    ("h3.conv3", "conv", 16, 8, True),
]


def load_model(path):
    """(tensors as float32 numpy arrays by canonical name, config dict)."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        if "rln_config" not in meta:
            sys.exit(f"{path}: no rln_config in the metadata; not an rln-engine model file")
        config = json.loads(meta["rln_config"])
        tensors = {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}
    if config.get("variant", "single") == "dual-concat":
        sys.exit("this peer runs single-channel models only")
    for name, kind, ci, co, bn in LAYERS:
        if kind == "conv":
            want = (co, ci, 3, 3, 3)
        elif kind == "up":
            want = (ci, co, 2, 2, 2)
        else:
            want = None
        if want is not None and tensors[name + ".weight"].shape != want:
            sys.exit(f"{name}.weight has shape {tensors[name + '.weight'].shape}, expected {want}")
        if bn:
            for s in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
                assert tensors[f"{name}.{s}"].shape == (co,), f"{name}.{s}"
    return tensors, config


def fold_bn(tensors, config):
    """Batch norm (running statistics) folded into the preceding conv's weights, as any
    inference engine does (rln-engine folds it too): w' = w·s, and the BN keeps only the
    shift (scale 1, mean 0, variance 1 − eps), with s = γ/√(var + eps). The network
    computes the same function, but the pre-BN conv outputs are no longer stored
    unscaled: with the authors' weights those exceed float16's range (65504) under AMP."""
    eps = config["bn_eps"]
    t = dict(tensors)
    for name, kind, ci, co, has_bn in LAYERS:
        if kind not in ("conv", "up") or not has_bn:
            continue
        p = name + ".bn."
        s = t[p + "weight"] / np.sqrt(t[p + "running_var"] + eps)
        w = t[name + ".weight"]
        # conv weight [out, in, k, k, k]; transposed conv [in, out, k, k, k]
        t[name + ".weight"] = (w * (s[:, None, None, None, None] if kind == "conv" else s[None, :, None, None, None])).astype(np.float32)
        t[p + "bias"] = (t[p + "bias"] - t[p + "running_mean"] * s).astype(np.float32)
        t[p + "weight"] = np.ones_like(s, dtype=np.float32)
        t[p + "running_mean"] = np.zeros_like(s, dtype=np.float32)
        t[p + "running_var"] = np.full_like(s, 1.0 - eps, dtype=np.float32)
    return t


def rln_forward(x, o, div_eps):
    """rln-spec.md section 3, line by line. x: N x 1 x D x H x W, normalized. Returns
    (y, E1r, E2r) at the input's size (odd sizes are mirror-padded to even and cropped)."""
    size = o.size(x)
    x = o.pad_even(x)
    sp, bn, conv, cat, cm, eps = o.sp, o.bn, o.conv3, o.cat, o.cm, div_eps

    def unit(name, t):
        return sp(bn(conv(t, name), name))

    # down-scale part (FP1, DV1, BP1 at half resolution)
    xd = o.pool2(x)
    a1 = unit("h1.fp.conv1", xd)
    a2 = unit("h1.fp.conv2", a1)
    fp1 = unit("h1.fp.conv3", cat(a1, a2)) + sp(xd)
    dv1 = bn(o.rl_div(xd, cm(fp1), eps), "h1.dv")
    b1 = unit("h1.bp.conv1", dv1)
    b2 = unit("h1.bp.conv2", b1)
    b3 = unit("h1.bp.conv3", cat(b2, b1))
    u = sp(bn(o.up2(b3, "h1.bp.up"), "h1.bp.up"))
    bp1 = unit("h1.bp.conv4", u)
    e1r = o.rl_mul(x, cm(bp1))
    e1 = sp(bn(e1r, "h1.e"))
    # original-scale part (FP2, DV2, BP2)
    c1 = unit("h2.fp.conv1", x)
    fp2 = unit("h2.fp.conv2", c1) + sp(x)
    dv2 = bn(o.rl_div(x, cm(fp2), eps), "h2.dv")
    d1 = unit("h2.bp.conv1", dv2)
    bp2 = unit("h2.bp.conv2", d1) + 1.0
    e2r = o.rl_mul(e1, cm(bp2))
    e2 = sp(bn(e2r, "h2.e"))
    # merge part
    f1 = sp(conv(e2, "h3.conv1"))
    f2 = sp(conv(cat(f1, e2, e1), "h3.conv2"))
    f3 = unit("h3.conv3", cat(f1, f2))
    y = cm(f3)
    return o.crop(y, size), o.crop(e1r, size), o.crop(e2r, size)


# A peer whose output is not finite or is off the CPU reference by more than this
# (relative L2) is invalid: reported, never used in a ratio.
VALID_REL_ERR = 1e-2


def fold_params(tensors, config):
    """Inference parameters with every batch norm (running statistics) folded:
    {conv/up name: (weight', bias)} with w' = w·s per output channel and
    bias = β − mean·s, s = γ/√(var + eps) (h3.conv1 and h3.conv2 have no BN: bias 0);
    {one-channel BN name: (scale, shift)} as Python floats."""
    eps = config["bn_eps"]
    P = {}
    for name, kind, ci, co, has_bn in LAYERS:
        if has_bn:
            p = name + ".bn."
            s = tensors[p + "weight"].astype(np.float64) / np.sqrt(tensors[p + "running_var"].astype(np.float64) + eps)
            b = tensors[p + "bias"].astype(np.float64) - tensors[p + "running_mean"].astype(np.float64) * s
        else:
            s, b = np.ones(co), np.zeros(co)
        if kind == "bn":
            P[name] = (float(s[0]), float(b[0]))
            continue
        w = tensors[name + ".weight"].astype(np.float64)
        w = w * (s[:, None, None, None, None] if kind == "conv" else s[None, :, None, None, None])
        P[name] = (w.astype(np.float32), b.astype(np.float32))
    return P


def split_in(w, widths):
    """A conv weight [out, in, ...] split along its input channels into parts of `widths`."""
    out, at = [], 0
    for c in widths:
        out.append(w[:, at : at + c])
        at += c
    assert at == w.shape[1], (at, w.shape)
    return out


def rln_forward_fused(x, o, P, div_eps):
    """rln-spec.md section 3 on folded parameters (fold_params), without concatenations
    or batch-norm calls: conv over parts = Σ conv(part), bias once; the RL nodes' channel
    means of `sp(z) + c` as cm(sp(z)) + c. Same function as rln_forward."""
    size = o.size(x)
    x = o.pad_even(x)
    sp, cm = o.sp, o.cm

    def conv(parts, name):
        return o.conv_parts(parts, name)

    def affine(t, name):
        s, b = P[name]
        return t * s + b

    # down-scale part (FP1, DV1, BP1 at half resolution)
    xd = o.pool2(x)
    a1 = sp(conv([xd], "h1.fp.conv1"))
    a2 = sp(conv([a1], "h1.fp.conv2"))
    m1 = cm(sp(conv([a1, a2], "h1.fp.conv3"))) + sp(xd)
    dv1 = affine(o.rl_div(xd, m1, div_eps), "h1.dv")
    b1 = sp(conv([dv1], "h1.bp.conv1"))
    b2 = sp(conv([b1], "h1.bp.conv2"))
    b3 = sp(conv([b2, b1], "h1.bp.conv3"))
    u = sp(o.up2_bias(b3, "h1.bp.up"))
    e1r = o.rl_mul(x, cm(sp(conv([u], "h1.bp.conv4"))))
    e1 = sp(affine(e1r, "h1.e"))
    # original-scale part (FP2, DV2, BP2)
    c1 = sp(conv([x], "h2.fp.conv1"))
    m2 = cm(sp(conv([c1], "h2.fp.conv2"))) + sp(x)
    dv2 = affine(o.rl_div(x, m2, div_eps), "h2.dv")
    d1 = sp(conv([dv2], "h2.bp.conv1"))
    e2r = o.rl_mul(e1, cm(sp(conv([d1], "h2.bp.conv2"))) + 1.0)
    e2 = sp(affine(e2r, "h2.e"))
    # merge part
    f1 = sp(conv([e2], "h3.conv1"))
    f2 = sp(conv([f1, e2, e1], "h3.conv2"))
    y = cm(sp(conv([f1, f2], "h3.conv3")))
    return o.crop(y, size), o.crop(e1r, size), o.crop(e2r, size)


class NumpyFusedOps:
    """The fused forward's primitives in float64 NumPy: checks rln_forward_fused against
    rln_forward without torch (tools/peers/test_rln_torch.py)."""

    def __init__(self, P, widths):
        self.P, self.widths = P, widths
        self.base = NumpyOps({}, {"bn_eps": 0.0})

    def __getattr__(self, k):
        return getattr(self.base, k)

    def conv_parts(self, parts, name):
        w, b = self.P[name]
        ws = split_in(w.astype(np.float64), [p.shape[1] for p in parts])
        self.base.t = {}
        out = None
        for p, wp in zip(parts, ws):
            self.base.t["_w.weight"] = wp
            y = self.base.conv3(p, "_w")
            out = y if out is None else out + y
        return out + b.astype(np.float64).reshape(1, -1, 1, 1, 1)

    def up2_bias(self, x, name):
        w, b = self.P[name]
        self.base.t = {"_u.weight": w.astype(np.float64)}
        return self.base.up2(x, "_u") + b.astype(np.float64).reshape(1, -1, 1, 1, 1)


class NumpyOps:
    """The primitives in float64 NumPy (NCDHW), for checking the network without torch."""

    def __init__(self, tensors, config):
        self.t = {k: v.astype(np.float64) for k, v in tensors.items()}
        self.bn_eps = config["bn_eps"]

    def size(self, x):
        return x.shape[2:]

    def pad_even(self, x):
        # symmetric mirror, edge repeated: for an odd size the extra plane repeats the last
        return np.pad(x, [(0, 0), (0, 0)] + [(0, s % 2) for s in x.shape[2:]], mode="edge")

    def crop(self, t, size):
        return t[:, :, : size[0], : size[1], : size[2]]

    def conv3(self, x, name):
        w = self.t[name + ".weight"]  # [out, in, 3, 3, 3]
        n, _, d, h, wd = x.shape
        xp = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1), (1, 1)])
        out = np.zeros((n, w.shape[0], d, h, wd))
        for a in range(3):
            for b in range(3):
                for c in range(3):
                    out += np.einsum("nidhw,oi->nodhw", xp[:, :, a : a + d, b : b + h, c : c + wd], w[:, :, a, b, c])
        return out

    def up2(self, x, name):
        w = self.t[name + ".weight"]  # [in, out, 2, 2, 2]
        n, _, d, h, wd = x.shape
        out = np.zeros((n, w.shape[1], 2 * d, 2 * h, 2 * wd))
        for a in range(2):
            for b in range(2):
                for c in range(2):
                    out[:, :, a::2, b::2, c::2] = np.einsum("nidhw,io->nodhw", x, w[:, :, a, b, c])
        return out

    def pool2(self, x):
        n, c, d, h, w = x.shape
        return x.reshape(n, c, d // 2, 2, h // 2, 2, w // 2, 2).mean(axis=(3, 5, 7))

    def bn(self, x, name):
        g, b = self.t[name + ".bn.weight"], self.t[name + ".bn.bias"]
        m, v = self.t[name + ".bn.running_mean"], self.t[name + ".bn.running_var"]
        r = lambda a: a.reshape(1, -1, 1, 1, 1)
        return (x - r(m)) / np.sqrt(r(v) + self.bn_eps) * r(g) + r(b)

    def sp(self, t):
        return np.logaddexp(0.0, t)

    def cat(self, *ts):
        return np.concatenate(ts, axis=1)

    def cm(self, t):
        return t.mean(axis=1, keepdims=True)

    def rl_div(self, a, b, eps):
        return a / (b + eps)

    def rl_mul(self, a, m):
        return a * m


class TorchOps:
    """The primitives with torch.nn.functional; weights on `device` in float32."""

    def __init__(self, tensors, config, device, channels_last=False):
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        self.bn_eps = config["bn_eps"]
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.t = {}
        for k, v in tensors.items():
            t = torch.from_numpy(v).to(device)
            if t.dim() == 5:
                t = t.contiguous(memory_format=fmt)
            self.t[k] = t

    def size(self, x):
        return tuple(x.shape[2:])

    def pad_even(self, x):
        d, h, w = x.shape[2:]
        if d % 2 == 0 and h % 2 == 0 and w % 2 == 0:
            return x
        return self.F.pad(x, (0, w % 2, 0, h % 2, 0, d % 2), mode="replicate")

    def crop(self, t, size):
        return t[:, :, : size[0], : size[1], : size[2]]

    def conv3(self, x, name):
        return self.F.conv3d(x, self.t[name + ".weight"], padding=1)

    def up2(self, x, name):
        return self.F.conv_transpose3d(x, self.t[name + ".weight"], stride=2)

    def pool2(self, x):
        return self.F.avg_pool3d(x, 2)

    def bn(self, x, name):
        p = name + ".bn."
        return self.F.batch_norm(
            x, self.t[p + "running_mean"], self.t[p + "running_var"], self.t[p + "weight"], self.t[p + "bias"], False, 0.0, self.bn_eps
        )

    def sp(self, t):
        return self.F.softplus(t)

    def cat(self, *ts):
        return self.torch.cat(ts, dim=1)

    def cm(self, t):
        return t.mean(dim=1, keepdim=True)

    def rl_div(self, a, b, eps):
        return a / (b + eps)

    def rl_mul(self, a, m):
        return a * m


class TorchFusedOps(TorchOps):
    """The fused forward's primitives with torch: folded weights (split by input part
    once, here) and biases on `device`; the RL division and update in float32 whatever
    the autocast dtype (their operands are cast up, their results stay float32)."""

    def __init__(self, P, config, device, channels_last=False):
        import torch

        super().__init__({}, config, device, channels_last)
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        on = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
        self.w, self.b = {}, {}
        for name, (w, b) in ((k, v) for k, v in P.items() if isinstance(v[0], np.ndarray)):
            self.w[name] = on(w).contiguous(memory_format=fmt)
            self.b[name] = on(b)
        self.fmt, self.parts = fmt, {}

    def conv_parts(self, parts, name):
        key = (name, tuple(p.shape[1] for p in parts))
        if key not in self.parts:
            self.parts[key] = [w.contiguous(memory_format=self.fmt) for w in split_in(self.w[name], list(key[1]))]
        ws = self.parts[key]
        out = self.F.conv3d(parts[0], ws[0], self.b[name], padding=1)
        for p, w in zip(parts[1:], ws[1:]):
            out = out + self.F.conv3d(p, w, None, padding=1)
        return out

    def up2_bias(self, x, name):
        return self.F.conv_transpose3d(x, self.w[name], self.b[name], stride=2)

    def rl_div(self, a, b, eps):
        return a.float() / (b.float() + eps)

    def rl_mul(self, a, m):
        return a.float() * m.float()


def make_train_ops(tensors, config, device, channels_last=False):
    """TorchOps for training (rln-spec sections 4-5): conv/up weights and BN gamma/beta as
    parameters, batch norm with batch statistics (momentum 0.01), and the paper-mode
    custom gradients of the RL nodes as autograd Functions:
      q = a / (b + eps):  dL/da := dL/dq, dL/db := -q^2 dL/dq
      e = a * m:          dL/da := dL/de, dL/dm = a dL/de   (E1r = x*m', E2r = E1*m)
    Both run in float32 under autocast (custom_fwd with cast_inputs)."""
    import torch

    try:
        custom_fwd = torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
        custom_bwd = torch.amp.custom_bwd(device_type="cuda")
    except (AttributeError, TypeError):  # torch < 2.4
        custom_fwd = torch.cuda.amp.custom_fwd(cast_inputs=torch.float32)
        custom_bwd = torch.cuda.amp.custom_bwd

    class PaperDiv(torch.autograd.Function):
        @staticmethod
        @custom_fwd
        def forward(ctx, a, b, eps):
            q = a / (b + eps)
            ctx.save_for_backward(q)
            return q

        @staticmethod
        @custom_bwd
        def backward(ctx, g):
            (q,) = ctx.saved_tensors
            return g, -q * q * g, None

    class PaperMul(torch.autograd.Function):
        @staticmethod
        @custom_fwd
        def forward(ctx, a, m):
            ctx.save_for_backward(a)
            return a * m

        @staticmethod
        @custom_bwd
        def backward(ctx, g):
            (a,) = ctx.saved_tensors
            return g, a * g

    class TrainOps(TorchOps):
        def __init__(self):
            super().__init__(tensors, config, device, channels_last)
            self.params = []
            for name, kind, ci, co, bn in LAYERS:
                keys = ([name + ".weight"] if kind in ("conv", "up") else []) + ([name + ".bn.weight", name + ".bn.bias"] if bn else [])
                for k in keys:
                    self.t[k] = torch.nn.Parameter(self.t[k])
                    self.params.append((k, self.t[k]))

        def bn(self, x, name):
            p = name + ".bn."
            return self.F.batch_norm(
                x, self.t[p + "running_mean"], self.t[p + "running_var"], self.t[p + "weight"], self.t[p + "bias"], True, 0.01, self.bn_eps
            )

        def rl_div(self, a, b, eps):
            return PaperDiv.apply(a, b, eps)

        def rl_mul(self, a, m):
            return PaperMul.apply(a, m)

    return TrainOps()


def rln_loss(y, e1r, x, g):
    """rln-spec section 5, one global SSIM over the whole batch, in float32."""
    y, e1r, x, g = y.float(), e1r.float(), x.float(), g.float()
    c1, c2 = 1e-4, 9e-4
    mse = ((y - g) ** 2).mean() + 1e-4
    aux = ((e1r - (0.8 * g + 0.2 * x)) ** 2).mean() + 1e-4
    my, mg = y.mean(), g.mean()
    vy, vg = ((y - my) ** 2).mean(), ((g - mg) ** 2).mean()
    cov = ((y - my) * (g - mg)).mean()
    s = (2 * my * mg + c1) * (2 * cov + c2) / ((my * my + mg * mg + c1) * (vy + vg + c2))
    return mse + 0.1 * aux - (0.5 * (1 + s)).log()


def train_main(a, tensors, config, res):
    """One training step per iteration (zero_grad, forward with batch statistics, loss,
    backward with the paper-mode gradients, Adam) at --dims, timed with CUDA events; with
    --check, the paper-mode gradients of the check file's batch against the engine's."""
    import torch

    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.startswith("cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if a.mode not in ("eager", "amp", "compile"):
        sys.exit(f"--train runs the modes eager, amp and compile; not {a.mode}")
    half = a.mode in ("amp", "compile")
    torch.backends.cudnn.benchmark = True
    eps = config["div_eps"]
    res["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    res["torch"] = torch.__version__
    res["train"] = True

    if a.check:
        from safetensors.numpy import load_file

        ref = load_file(a.check)
        ops = make_train_ops(tensors, config, dev)
        x = torch.from_numpy(ref["x"].astype(np.float32)).to(dev)
        g = torch.from_numpy(ref["g"].astype(np.float32)).to(dev)
        y, e1r, _ = rln_forward(x, ops, eps)
        loss = rln_loss(y, e1r, x, g)
        loss.backward()
        per, worst = {}, 0.0
        for k, p in ops.params:
            want = ref.get("grad." + k)
            if want is None:
                continue
            e = rel_l2(p.grad.double().cpu().numpy().reshape(-1), want.reshape(-1))
            per[k] = e
            worst = max(worst, e)
        # per layer (weight, gamma, beta together): the gamma gradient of a one-channel
        # batch norm (dv, E) is one sum with heavy cancellation, not a fair single number
        layers, worst_layer = {}, 0.0
        for name, kind, ci, co, bn in LAYERS:
            keys = [k for k, _ in ops.params if k.startswith(name + ".") and ("grad." + k) in ref]
            if keys:
                got = np.concatenate([ops.t[k].grad.double().cpu().numpy().reshape(-1) for k in keys])
                want = np.concatenate([ref["grad." + k].reshape(-1) for k in keys])
                layers[name] = rel_l2(got, want)
                worst_layer = max(worst_layer, layers[name])
        res["check"] = {"loss_torch": float(loss), "loss_engine": float(ref["loss"][0]), "rel_l2": per, "worst_tensor_rel_l2": worst,
                        "layers_rel_l2": layers, "worst_layer_rel_l2": worst_layer}
        print(f"torch train check: worst layer rel L2 {worst_layer:.2e}", flush=True)
        print(f"torch train check (eager fp32 paper-mode gradients vs the engine's GPU): loss {float(loss):.6f} vs {float(ref['loss'][0]):.6f}, "
              f"worst tensor rel L2 {worst:.2e}; " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:4]), flush=True)
        del ops, x, g, y, e1r, loss

    if a.no_time:
        return
    n, d, h, w = parse_dims(a.dims)
    ops = make_train_ops(tensors, config, dev, channels_last=half)
    opt = torch.optim.Adam([p for _, p in ops.params], lr=0.015, betas=(0.9, 0.999), eps=1e-8)
    scaler = None
    if half and cuda:
        try:
            scaler = torch.amp.GradScaler("cuda")
        except (AttributeError, TypeError):  # torch < 2.3
            scaler = torch.cuda.amp.GradScaler()

    def fwd_loss(x, g):
        y, e1r, _ = rln_forward(x, ops, eps)
        return rln_loss(y, e1r, x, g)

    f = torch.compile(fwd_loss) if a.mode == "compile" else fwd_loss

    def step(x, g):
        opt.zero_grad(set_to_none=True)
        if half:
            with torch.autocast(device_type="cuda", dtype=torch.float16):
                loss = f(x, g)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss = f(x, g)
            loss.backward()
            opt.step()
        return loss

    rng = np.random.default_rng(1)

    def prep(v):
        t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(dev)
        return t.contiguous(memory_format=torch.channels_last_3d) if half else t

    batches = [(prep(rng.random((n, 1, d, h, w), dtype=np.float32)), prep(rng.random((n, 1, d, h, w), dtype=np.float32))) for _ in range(2)]
    t0 = time.time()
    step(*batches[0])  # first call: compilation for torch.compile
    if cuda:
        torch.cuda.synchronize()
    res["first_call_seconds"] = time.time() - t0
    print(f"torch train {a.mode}: first step {res['first_call_seconds']:.1f} s", flush=True)
    for i in range(a.warmup):
        step(*batches[i % 2])
    times, losses = [], []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(a.reps):
        if cuda:
            s_, e_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s_.record()
            loss = step(*batches[i % 2])
            e_.record()
            e_.synchronize()
            times.append(s_.elapsed_time(e_))
        else:
            t = time.time()
            loss = step(*batches[i % 2])
            times.append(1e3 * (time.time() - t))
        losses.append(float(loss))
    if cuda:
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    times.sort()
    med = times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1] + times[len(times) // 2])
    res.update(dims=[n, d, h, w], reps=a.reps, median_ms=med, min_ms=times[0], max_ms=times[-1], step_s=med * 1e-3,
               voxels_per_s=n * d * h * w / (med * 1e-3), loss_last=losses[-1] if losses else None,
               nonfinite_loss=int(sum(1 for v in losses if not math.isfinite(v))))
    print(f"torch train {a.mode} {res['device']} {n}x{d}x{h}x{w}: median step {med:.2f} ms (min {times[0]:.2f}, max {times[-1]:.2f}), "
          f"peak {res.get('peak_mem_bytes', 0) / 2**20:.0f} MiB, last loss {res['loss_last']}", flush=True)


# mode -> (autocast dtype name or None, compile, TensorRT)
MODES = {
    "eager": (None, False, False),
    "amp": ("float16", False, False),
    "amp_bf16": ("bfloat16", False, False),
    "compile": ("float16", True, False),
    "compile_bf16": ("bfloat16", True, False),
    "trt": ("float16", False, True),
}


def validity(y, y_ref):
    """(rel_err, nonfinite, valid) of a peer's prediction against the CPU reference:
    valid iff every value is finite and rel_err <= VALID_REL_ERR."""
    y = np.asarray(y)
    bad = int(np.sum(~np.isfinite(y)))
    e = rel_l2(np.where(np.isfinite(y), y, 0.0), y_ref) if bad == 0 else float("inf")
    return e, bad, bool(bad == 0 and e <= VALID_REL_ERR)


def rel_l2(a, r):
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    den = np.sqrt(np.sum(r * r))
    num = np.sqrt(np.sum((a - r) ** 2))
    return float(num / den) if den > 0 else float(num)


def parse_dims(s):
    v = [int(p) for p in s.split(",")]
    return v if len(v) == 4 else [1] + v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", choices=["torch", "numpy"], default="torch")
    ap.add_argument("--mode", choices=list(MODES), default="eager")
    ap.add_argument("--unfused", action="store_true",
                    help="run the line-by-line rln_forward (batch_norm calls, torch.cat) instead of rln_forward_fused")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dims", default="1,256,256,256", help="n,d,h,w of the timed input")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-time", action="store_true", help="only --check")
    ap.add_argument("--check", help="a gpu_tool predict file to compare against")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--train", action="store_true",
                    help="time training steps (batch statistics, paper-mode gradients, Adam) instead of inference; "
                         "--check then takes a `gpu_tool train-bench --check-out` file")
    ap.add_argument("--fold-bn", choices=["auto", "yes", "no"], default="auto",
                    help="fold batch norm into the conv weights (auto: for amp and compile, whose float16 pre-BN outputs overflow otherwise)")
    a = ap.parse_args()
    if a.check and not os.path.exists(a.check):
        print(f"warning: {a.check} does not exist (did the engine's predict step fail?): timing only", flush=True)
        a.check = None
    tensors, config = load_model(a.model)
    eps = config["div_eps"]
    if a.train:
        res = {"mode": a.mode, "backend": a.backend}
        try:
            train_main(a, tensors, config, res)
        except BaseException as ex:  # recorded for the summary, then reported as usual
            res["error"] = repr(ex)[:500]
            raise
        finally:
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(res, f, indent=1)
        return
    amp_dtype, compiled, trt = MODES[a.mode]
    half = amp_dtype is not None
    fused = not a.unfused
    fold = fused or a.fold_bn == "yes" or (a.fold_bn == "auto" and half)
    if fold and not fused:
        tensors = fold_bn(tensors, config)
    res = {"mode": a.mode, "backend": a.backend, "fold_bn": fold, "fused": fused}
    P = fold_params(tensors, config) if fused else None

    if a.backend == "numpy":
        if not a.check:
            sys.exit("--backend numpy only checks (--check FILE)")
        from safetensors.numpy import load_file

        ref = load_file(a.check)
        xr = ref["x"].astype(np.float64)
        if fused:
            y, _, _ = rln_forward_fused(xr, NumpyFusedOps(P, None), P, eps)
        else:
            y, _, _ = rln_forward(xr, NumpyOps(tensors, config), eps)
        res["check"] = {k: rel_l2(y, v) for k, v in ref.items() if k.startswith("y_")}
        print(json.dumps(res, indent=1))
        if a.json:
            open(a.json, "w").write(json.dumps(res, indent=1))
        return

    import torch

    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.startswith("cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = half
    if fused:
        ops = TorchFusedOps(P, config, dev, channels_last=half)
        fwd = lambda x: rln_forward_fused(x, ops, P, eps)[0]
    else:
        ops = TorchOps(tensors, config, dev, channels_last=half)
        fwd = lambda x: rln_forward(x, ops, eps)[0]
    dtype = getattr(torch, amp_dtype) if half else None
    if compiled:
        # max-autotune: Inductor's autotuned kernels and CUDA graphs (cudagraph trees)
        fwd = torch.compile(fwd, mode="max-autotune")
    res["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    res["torch"] = torch.__version__
    res["amp_dtype"] = amp_dtype

    def autocast():
        return torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype if cuda else torch.bfloat16)

    if trt:
        try:
            import torch_tensorrt  # noqa: F401
        except Exception as ex:
            res["error"] = f"TensorRT not available: {ex!r}"[:300]
            print(f"torch trt: {res['error']}", flush=True)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(res, f, indent=1)
            return
        res["torch_tensorrt"] = torch_tensorrt.__version__

        class Net(torch.nn.Module):
            def forward(self, x):
                return fwd(x)

        trt_cache = {}

        def fwd_trt(x):
            key = tuple(x.shape)
            if key not in trt_cache:
                trt_cache[key] = torch_tensorrt.compile(Net().eval(), ir="dynamo", inputs=[x],
                                                        enabled_precisions={torch.float16, torch.float32})
            return trt_cache[key](x)

    def run(x):
        with torch.inference_mode():
            if trt:
                return fwd_trt(x)
            if half:
                with autocast():
                    return fwd(x)
            return fwd(x)

    def prep(xn):
        x = torch.from_numpy(np.ascontiguousarray(xn, dtype=np.float32)).to(dev)
        return x.contiguous(memory_format=torch.channels_last_3d) if half else x

    if a.check:
        from safetensors.numpy import load_file

        ref = load_file(a.check)
        t0 = time.time()
        y = run(prep(ref["x"])).float().cpu().numpy()
        if compiled:  # CUDA graphs may reuse the output buffer: copy before the next call
            y = y.copy()
        res["check_seconds"] = time.time() - t0
        res["check"] = {k: rel_l2(y, v) for k, v in ref.items() if k.startswith("y_")}
        res["check_nonfinite"] = int(np.sum(~np.isfinite(y)))
        if "y_cpu" in ref:
            res["rel_err"], _, res["valid"] = validity(y, ref["y_cpu"])
        print(f"torch {a.mode}: rel L2 vs " + ", ".join(f"{k} {v:.2e}" for k, v in res["check"].items())
              + f"; valid {res.get('valid')}", flush=True)

    if not a.no_time:
        n, d, h, w = parse_dims(a.dims)
        rng = np.random.default_rng(1)
        x = prep(rng.random((n, 1, d, h, w), dtype=np.float32))
        t0 = time.time()
        run(x)  # first call: compilation for torch.compile
        if cuda:
            torch.cuda.synchronize()
        res["first_call_seconds"] = time.time() - t0
        print(f"torch {a.mode}: first call {res['first_call_seconds']:.1f} s", flush=True)
        for _ in range(a.warmup):
            run(x)
        times = []
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(a.reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                run(x)
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
            res["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        else:
            for _ in range(a.reps):
                t = time.time()
                run(x)
                times.append(1e3 * (time.time() - t))
        times.sort()
        med = times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1] + times[len(times) // 2])
        res.update(dims=[n, d, h, w], reps=a.reps, median_ms=med, min_ms=times[0], max_ms=times[-1])
        res["voxels_per_s"] = n * d * h * w / (med * 1e-3)
        print(
            f"torch {a.mode} {res['device']} {n}x{d}x{h}x{w}: median {med:.2f} ms (min {times[0]:.2f}, max {times[-1]:.2f}), "
            f"{res['voxels_per_s'] * 1e-9:.4f} Gvoxel/s, peak {res.get('peak_mem_bytes', 0) / 2**20:.0f} MiB",
            flush=True,
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
