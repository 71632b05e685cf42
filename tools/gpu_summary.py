#!/usr/bin/env python3
"""Summary of tools/gpu-check.sh: reads the step logs and JSON files in OUT, writes
OUT/gpu-latest.json and OUT/summary.txt, and prints the table. Missing or failed steps
give nulls, never an exception: this must print something after any partial run.

    python3 tools/gpu_summary.py OUT BUNDLE
"""
import csv
import datetime
import io
import json
import math
import os
import re
import sys


# the PyTorch peers of tools/peers/rln_torch.py (its MODES), and its validity bound
PEERS = ("eager", "amp", "amp_bf16", "compile", "compile_bf16", "trt")
VALID_REL_ERR = 1e-2


def e2e_section(P, commit):
    """The streaming pipeline's end-to-end runs (issue 13): one object per volume, plus
    the projection to the paper's 131 Gvoxel stack (authors: 3.7 h)."""
    out = {}
    for name in ("zarr", "tiff"):
        s = load(P(f"e2e_{name}.json"))
        if not s:
            out[name] = None
            continue
        out[name] = {
            "voxels": s.get("voxels"),
            "seconds": s.get("seconds"),
            "voxels_per_s": s.get("voxels_per_s"),
            "format_in": s.get("format_in"),
            "format_out": s.get("format_out"),
            "peak_rss_bytes": s.get("peak_rss_bytes"),
            "peak_device_bytes": s.get("peak_device_bytes"),
            "phases": s.get("phases"),
            "commit": commit,
        }
    z = out.get("zarr") or {}
    vps = z.get("voxels_per_s")
    out["goals"] = {
        "zarr_ge_1_gvoxel_per_s": (vps >= 1e9) if vps else None,
        "tiff_512x1024x1024_le_3_s": ((out.get("tiff") or {}).get("seconds") or 1e9) <= 3.0 if out.get("tiff") else None,
        "peak_host_le_16_gb": (z.get("peak_rss_bytes") or 1e99) <= 16e9 if z else None,
        "projected_131_gvoxel_hours": (131e9 / vps / 3600) if vps else None,
        "authors_hours": 3.7,
    }
    return out


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def num(v):
    try:
        v = float(str(v).replace(",", ""))
        return v if v == v else None
    except (TypeError, ValueError):
        return None


def maxn(*vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    return max(vals) if vals else None


def parse_ncu(log):
    """Rows of an `ncu --csv --page raw --print-units base` log: kernel name -> metrics."""
    lines = log.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(l for l in lines[start:] if l.startswith('"')))))
    head, out = rows[0], []
    for r in rows[1:]:
        if len(r) != len(head) or not r[0].strip().isdigit():
            continue  # the units row
        d = dict(zip(head, r))
        out.append({"kernel": d.get("Kernel Name", "?"), **{k: num(v) for k, v in d.items() if "__" in k}})
    return out


def jsonl(path):
    out = []
    for line in text(path).splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def train_section(P):
    """The training results: engine step benchmark, PyTorch peer steps, checks, tests,
    conformance in training mode, and the CLI run with its extrapolation."""
    tb = load(P("train_bench.json")) or {}
    tt = {k: load(P(f"torch_train_{k}.json")) or {} for k in ("eager", "amp", "compile")}
    conf = load(P("train_conformance.json")) or {}
    rows = conf.get("rows") or []

    def worst(prefix):
        return maxn(*[r.get("rel_err") for r in rows if r.get("key", "").startswith(prefix)])

    tests = text(P("train_tests.log"))
    m = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed", tests)
    test_summary = {"result": m[-1][0], "passed": int(m[-1][1]), "failed": int(m[-1][2])} if m else None
    failed = re.findall(r"^TEST (\S+): FAILED", tests, re.M)
    fails_detail = re.findall(r"^(.*rel L2.*FAIL.*)$", tests, re.M)[:20]

    # CLI run: steps and validations from the JSON-lines log
    log = jsonl(P("cli_train.jsonl"))
    steps = [r for r in log if "loss" in r and "step" in r]
    vals = [r for r in log if "val_psnr" in r]
    wall = re.search(r"CLI_TRAIN_WALL_S (\S+)", text(P("cli_train.log")))
    wall = num(wall.group(1)) if wall else None
    cli = {"steps": len(steps), "wall_s": wall}
    by_step = {r["step"]: r.get("elapsed_s") for r in steps}
    if steps:
        last = steps[-1]["step"]
        a = 100 if (100 in by_step and last > 100) else steps[0]["step"]
        if by_step.get(a) is not None and by_step.get(last) is not None and last > a:
            rate = (by_step[last] - by_step[a]) / (last - a)
            cli["s_per_step"] = rate
            # everything that is not a step (data synthesis, start-up, the final save) once,
            # then 10 000 steps at the measured rate (validation every 100 steps included)
            fixed = (wall - last * rate) if wall else None
            cli["full_recipe_s"] = (fixed + 10000 * rate) if fixed is not None else 10000 * rate
            cli["full_recipe_note"] = f"measured {last} steps ({a}..{last} for the rate, validation every 100 steps included), extrapolated to 10 000"
        cli["loss_first"] = steps[0].get("loss")
        cli["loss_last"] = steps[-1].get("loss")
    if vals:
        cli["val_psnr_last"] = vals[-1].get("val_psnr")
        cli["val_ssim_last"] = vals[-1].get("val_ssim")

    def tstep(k):
        return (tt[k] or {}).get("step_s")

    mixed = mixed_section(P, tb, vals)

    eng = tb.get("step_s")
    chk = (tt["eager"] or {}).get("check") or {}
    return {
        "dims": tb.get("dims"),
        "step_s": eng,
        "host_step_s": tb.get("host_step_s"),
        "kernel_s": tb.get("kernel_s"),
        "phases_ms": tb.get("phases_ms"),
        "slowest_kernels_ms": (tb.get("kernels_ms") or [])[:10],
        "launches_per_step": tb.get("launches"),
        "tflops": tb.get("tflops"),
        "peak_mem_bytes": tb.get("peak_mem_bytes"),
        "loss_first_last": [tb.get("loss_first"), tb.get("loss_last")],
        "torch_fp32_step_s": tstep("eager"),
        "torch_amp_step_s": tstep("amp"),
        "torch_compile_step_s": tstep("compile"),
        "torch_compile_first_call_s": (tt["compile"] or {}).get("first_call_seconds"),
        "torch_peak_mem_bytes": {k: (v or {}).get("peak_mem_bytes") for k, v in tt.items()},
        "torch_errors": {k: (v or {}).get("error") for k, v in tt.items() if (v or {}).get("error")},
        "speedup_vs_torch": {k: (tstep(k) / eng if (eng and tstep(k)) else None) for k in ("eager", "amp", "compile")},
        "gpu_vs_cpu_grad_worst_tensor": ((tb.get("check") or {}).get("worst_tensor_rel_l2")),
        "torch_vs_engine_grad": {"worst_tensor": chk.get("worst_tensor_rel_l2"), "worst_layer": chk.get("worst_layer_rel_l2"),
                                 "loss_torch": chk.get("loss_torch"), "loss_engine": chk.get("loss_engine")},
        "conformance": {"passed": conf.get("passed"), "infer": worst("infer."), "train": worst("train."), "grad": worst("grad.")},
        "tests": test_summary,
        "failed_tests": failed,
        "failed_checks": fails_detail,
        "cli": cli,
        "full_recipe_s": cli.get("full_recipe_s"),
        "full_recipe_note": cli.get("full_recipe_note"),
        **mixed,
    }


def mixed_section(P, tb, vals_fp32):
    """`train --precision mixed` (issue 16 item 3): the mixed step (train_bench_mixed.json)
    next to FP32's, and the validation curves of the CLI runs on the same seed (FP32:
    cli_train.jsonl, mixed: cli_train_mixed.jsonl) with the run-to-run spread measured by
    an FP32 run on another seed (cli_train_spread.jsonl: another initialization, crops and
    synthetic data, so an upper estimate of the spread)."""
    tm = load(P("train_bench_mixed.json")) or {}
    eng, mix = tb.get("step_s"), tm.get("step_s")

    def curve(name):
        return {r["step"]: r for r in jsonl(P(name)) if "val_psnr" in r and "step" in r}

    f, m, s = ({r["step"]: r for r in vals_fp32 if "step" in r}, curve("cli_train_mixed.jsonl"), curve("cli_train_spread.jsonl"))
    common = sorted(set(f) & set(m))
    out = {
        "mixed_step_s": mix,
        "mixed_steps_per_s": (1.0 / mix) if mix else None,
        "mixed_speedup_vs_fp32": (eng / mix) if (eng and mix) else None,
        "mixed_kernel_s": tm.get("kernel_s"),
        "mixed_phases_ms": tm.get("phases_ms"),
        "mixed_slowest_kernels_ms": (tm.get("kernels_ms") or [])[:10],
        "mixed_loss_first_last": [tm.get("loss_first"), tm.get("loss_last")] if tm else None,
    }
    if common:
        dp = [abs(m[k]["val_psnr"] - f[k]["val_psnr"]) for k in common]
        ds = [abs(m[k].get("val_ssim", 0) - f[k].get("val_ssim", 0)) for k in common]
        sp = [abs(s[k]["val_psnr"] - f[k]["val_psnr"]) for k in common if k in s]
        ss = [abs(s[k].get("val_ssim", 0) - f[k].get("val_ssim", 0)) for k in common if k in s]
        within = (max(dp) <= max(sp) and max(ds) <= max(ss)) if sp else None
        out["mixed_validation"] = {
            "steps": common,
            "fp32_val_psnr": [f[k]["val_psnr"] for k in common],
            "mixed_val_psnr": [m[k]["val_psnr"] for k in common],
            "fp32_val_ssim": [f[k].get("val_ssim") for k in common],
            "mixed_val_ssim": [m[k].get("val_ssim") for k in common],
            "max_abs_psnr_diff": max(dp),
            "max_abs_ssim_diff": max(ds),
            "spread_max_abs_psnr_diff": max(sp) if sp else None,
            "spread_max_abs_ssim_diff": max(ss) if ss else None,
            "within_spread": within,
            "note": "same seed and data for FP32 and mixed; spread = FP32 on another seed (other data too)",
        }
    else:
        out["mixed_validation"] = None
    return out


def train_lines(t):
    f = lambda v, k=1e3, u="ms": f"{v * k:.2f} {u}" if isinstance(v, (int, float)) else "-"
    L = [f"---- training at {t.get('dims') or '?'} (batch × crop), CUDA events, median"]
    L.append(f"engine step {f(t['step_s'])} (host clock {f(t['host_step_s'])}; kernels {f(t['kernel_s'])} in {t.get('launches_per_step') or '-'} launches), "
             f"{t['tflops'] or 0:.2f} TFLOP/s, peak {(t['peak_mem_bytes'] or 0) / 2**20:.0f} MiB")
    sp = t["speedup_vs_torch"]
    L.append("torch step: " + ", ".join(
        f"{k} {f(t[f'torch_{n}_step_s'])} (engine {sp[k]:.1f}x)" if sp[k] else f"{k} {f(t[f'torch_{n}_step_s'])}"
        for k, n in (("eager", "fp32"), ("amp", "amp"), ("compile", "compile"))))
    if t.get("phases_ms"):
        L.append("engine phases (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in t["phases_ms"].items()))
    if t.get("mixed_step_s"):
        L.append(f"mixed precision step {f(t['mixed_step_s'])} ({t['mixed_speedup_vs_fp32'] or 0:.2f}x FP32's)")
    mv = t.get("mixed_validation")
    if mv:
        g = lambda v, n: f"{v:.{n}f}" if isinstance(v, (int, float)) else "-"
        L.append(f"mixed vs FP32 validation (steps {mv['steps'][0]}..{mv['steps'][-1]}): max |Δpsnr| {g(mv['max_abs_psnr_diff'], 3)} dB, "
                 f"|Δssim| {g(mv['max_abs_ssim_diff'], 4)}; spread (FP32, other seed) {g(mv['spread_max_abs_psnr_diff'], 3)} dB, "
                 f"{g(mv['spread_max_abs_ssim_diff'], 4)}; within spread: {mv['within_spread']}")
    c = t["conformance"]
    e = lambda v: f"{v:.1e}" if isinstance(v, (int, float)) else "-"
    ts = t.get("tests") or {}
    L.append(f"train tests: {ts.get('result', 'not run')} ({ts.get('passed', 0)} passed, {ts.get('failed', 0)} failed"
             f"{': ' + ', '.join(t['failed_tests']) if t['failed_tests'] else ''}); conformance on GPU (train mode): "
             f"{'PASSED' if c['passed'] else ('FAILED' if c['passed'] is False else '-')} infer {e(c['infer'])} train {e(c['train'])} grad {e(c['grad'])}")
    tv = t["torch_vs_engine_grad"]
    L.append(f"gradients 2x32^3: engine GPU vs CPU worst tensor {e(t['gpu_vs_cpu_grad_worst_tensor'])}; torch eager vs engine GPU worst layer "
             f"{e(tv['worst_layer'])}, worst tensor {e(tv['worst_tensor'])}, loss {tv['loss_torch']} vs {tv['loss_engine']}")
    cli = t["cli"]
    L.append(f"CLI train --device cuda: {cli.get('steps', 0)} steps, wall {f(cli.get('wall_s'), 1, 's')}, {f(cli.get('s_per_step'))}/step; "
             f"full recipe {f(t.get('full_recipe_s'), 1 / 60, 'min')} ({t.get('full_recipe_note') or 'not measured'}); "
             f"loss {cli.get('loss_first')} -> {cli.get('loss_last')}, val PSNR {cli.get('val_psnr_last')}")
    return L


def main():
    out_dir, bundle = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "gpu-bundle"
    P = lambda n: os.path.join(out_dir, n)
    manifest = load(os.path.join(bundle, "MANIFEST.json")) or {}
    env = text(P("env.log"))
    device = driver = None
    m = re.search(r"^name, driver_version.*\n(.+)$", env, re.M)
    if m:
        parts = [p.strip() for p in m.group(1).split(",")]
        device, driver = parts[0], parts[1] if len(parts) > 1 else None

    bench = {k: load(P(f"bench_{k}.json")) for k in ("f32", "f16", "f16-tc", "bf16-tc")}
    torch = {k: load(P(f"torch_{k}.json")) for k in PEERS}
    pred = load(P("predict.json")) or {}
    conf = load(P("conformance.json")) or []
    vps = {k: (b or {}).get("voxels_per_s") for k, b in bench.items()}
    tvps = {k: (t or {}).get("voxels_per_s") for k, t in torch.items()}
    if device is None:
        device = next((b["device"] for b in bench.values() if b), None) or next((t["device"] for t in torch.values() if t and "device" in t), None)

    def conf_max(mode):
        rows = next((c["rows"] for c in conf if c.get("mode") == mode), [])
        return maxn(*[r.get("rel_err") for r in rows])

    def pred_err(mode):
        return (pred.get(mode) or {}).get("rel_l2_vs_cpu")

    err = {k: maxn(pred_err(k), conf_max(k)) for k in ("f32", "f16", "f16-tc", "bf16-tc")}

    steps = {}
    for line in text(P("steps.tsv")).splitlines():
        f = line.split("\t")
        if len(f) == 3:
            steps[f[0]] = {"status": f[1], "seconds": num(f[2])}
    tests = text(P("gpu_tests.log"))
    m = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed", tests)
    test_summary = {"result": m[-1][0], "passed": int(m[-1][1]), "failed": int(m[-1][2])} if m else None
    failed_tests = re.findall(r"^test (\S+) \.\.\. FAILED", tests, re.M)
    worst = re.search(r"worst rel L2 vs CPU: f32 (\S+), f16 (\S+), f16-tc (\S+)", tests)
    if worst:
        for k, v in zip(("f32", "f16", "f16-tc"), worst.groups()):
            err[k] = maxn(err[k], num(v))
    mem = re.search(r"ERROR SUMMARY: (\d+) error", text(P("memcheck.log")))
    race = re.search(r"RACECHECK SUMMARY: (\d+) hazard", text(P("racecheck.log")))
    e2e = re.search(r"INFER_E2E voxels/s (\S+)", text(P("infer.log")))
    e2e_net = re.search(r"network [\d.]+ s \(([\d.e+-]+) voxels/s\)", text(P("infer.log")))

    sol = parse_ncu(text(P("ncu_sol.log")))
    fl = parse_ncu(text(P("ncu_flops.log")))
    ncu = []
    for i, r in enumerate(sol or fl):
        f = fl[i] if i < len(fl) else {}
        t = r.get("gpu__time_duration.sum") or f.get("gpu__time_duration.sum")
        flop = None
        if f.get("smsp__sass_thread_inst_executed_op_ffma_pred_on.sum") is not None:
            flop = 2 * f["smsp__sass_thread_inst_executed_op_ffma_pred_on.sum"] + 4096 * (f.get("sm__inst_executed_pipe_tensor_op_hmma.sum") or 0)
        dram = (r.get("dram__bytes_read.sum") or 0) + (r.get("dram__bytes_write.sum") or 0)
        ncu.append({
            "kernel": r["kernel"],
            "time_us": t / 1e3 if t else None,
            "tflops": flop / t * 1e-3 if (flop is not None and t) else None,
            "dram_gbs": dram / t if t else None,
            "sm_pct": r.get("sm__throughput.avg.pct_of_peak_sustained_elapsed"),
            "occupancy_pct": r.get("sm__warps_active.avg.pct_of_peak_sustained_active"),
            "smem_bank_conflicts": f.get("l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum"),
        })

    peers = {}
    for k, t in torch.items():
        if not t:
            continue
        chk = t.get("check") or {}
        rel = t.get("rel_err", chk.get("y_cpu"))
        nonfinite = t.get("check_nonfinite")
        valid = bool(
            t.get("voxels_per_s") and isinstance(rel, (int, float)) and math.isfinite(rel)
            and rel <= VALID_REL_ERR and not nonfinite
        )
        peers[k] = {"voxels_per_s": t.get("voxels_per_s"), "rel_err": rel, "nonfinite": nonfinite, "valid": valid,
                    "amp_dtype": t.get("amp_dtype"), "error": t.get("error")}
    valid_peers = [(k, p["voxels_per_s"]) for k, p in peers.items() if p["valid"]]
    best_peer = max(valid_peers, key=lambda kv: kv[1]) if valid_peers else None

    result = {
        "device": device,
        "driver": driver,
        "commit": manifest.get("commit"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dims": (bench.get("f16-tc") or {}).get("dims"),
        "infer": {
            "fp32_voxels_per_s": vps["f32"],
            "fp16_voxels_per_s": vps["f16-tc"],
            "bf16_voxels_per_s": vps["bf16-tc"],
            "max_rel_err_bf16": err["bf16-tc"],
            # every PyTorch peer with its error against the CPU reference; only valid
            # ones (finite, rel_err <= 1e-2) enter best_valid_peer and the ratio
            "peers": peers,
            "best_valid_peer": best_peer[0] if best_peer else None,
            "best_valid_peer_voxels_per_s": best_peer[1] if best_peer else None,
            "fp16_over_best_valid_peer": (vps["f16-tc"] / best_peer[1]) if (best_peer and vps["f16-tc"]) else None,
            "kernels_ms": {k: [(x["kernel"], x["median_ms"]) for x in (b or {}).get("kernels", [])] for k, b in bench.items()},
            "fp16_ffma_voxels_per_s": vps["f16"],
            "torch_fp32_voxels_per_s": tvps["eager"],
            "torch_amp_voxels_per_s": tvps["amp"],
            "torch_compile_voxels_per_s": tvps["compile"],
            "max_rel_err_fp32": err["f32"],
            "max_rel_err_fp16": err["f16-tc"],
            "max_rel_err_fp16_ffma": err["f16"],
            "e2e_voxels_per_s": num(e2e.group(1)) if e2e else None,
            "e2e_network_voxels_per_s": num(e2e_net.group(1)) if e2e_net else None,
        },
        "peak_mem_bytes": {k: (b or {}).get("peak_mem_bytes") for k, b in bench.items()},
        "torch_peak_mem_bytes": {k: (t or {}).get("peak_mem_bytes") for k, t in torch.items()},
        "torch_check": {k: (t or {}).get("check") for k, t in torch.items()},
        "torch_compile_first_call_s": (torch.get("compile") or {}).get("first_call_seconds"),
        "tests": test_summary,
        "failed_tests": failed_tests,
        "memcheck_errors": int(mem.group(1)) if mem else None,
        "racecheck_hazards": int(race.group(1)) if race else None,
        "steps": steps,
        "kernels_ms": {k: [(x["kernel"], x["median_ms"]) for x in (b or {}).get("kernels", [])] for k, b in bench.items()},
        "ncu_f16tc_128": ncu,
        "bundle": {"commit": manifest.get("commit"), "dirty_files": manifest.get("dirty_files"), "built": manifest.get("built")},
    }
    result["e2e"] = e2e_section(P, manifest.get("commit"))
    try:
        result["train"] = train_section(P)
    except Exception as ex:  # the summary must print something after any partial run
        result["train"] = {"error": f"summary of the training steps failed: {ex!r}"}
    with open(P("gpu-latest.json"), "w") as f:
        json.dump(result, f, indent=1)

    g = lambda v: f"{v * 1e-9:8.3f}" if v else "       -"
    ratio = lambda a, b: f"{a / b:7.1f}x" if (a and b) else "       -"
    e = lambda v: f"{v:9.1e}" if isinstance(v, (int, float)) else "        -"
    L = []
    L.append(f"==== rln-engine GPU check: {device or '?'}, driver {driver or '?'}, commit {(manifest.get('commit') or '?')[:12]}, {result['date']}")
    dims = result["dims"] or "?"
    L.append(f"forward throughput at {dims} (CUDA events, median), Gvoxel/s; ratio = engine / torch mode; rel L2 = worst vs CPU engine and TF vectors")
    L.append(f"{'mode':<24}{'Gvox/s':>8} {'/eager':>8} {'/amp':>8} {'/compile':>8} {'rel L2':>9}")
    for name, k in (("engine f32", "f32"), ("engine f16 (FP32 cores)", "f16"), ("engine f16-tc (tensor)", "f16-tc"),
                    ("engine bf16-tc (tensor)", "bf16-tc")):
        v = vps[k]
        L.append(f"{name:<24}{g(v)} {ratio(v, tvps['eager'])} {ratio(v, tvps['amp'])} {ratio(v, tvps['compile'])} {e(err[k])}")
    for name, k in (("torch eager fp32", "eager"), ("torch amp fp16", "amp"), ("torch amp+compile", "compile")):
        chk = (torch.get(k) or {}).get("check") or {}
        L.append(f"{name:<24}{g(tvps[k])} {'':>8} {'':>8} {'':>8} {e(chk.get('y_cpu'))}  (vs engine f32 {e(chk.get('y_f32')).strip()}, f16-tc {e(chk.get('y_f16_tc')).strip()})")
    L.append("torch peers (voxels/s, rel L2 vs CPU, valid): " + "; ".join(
        f"{k} {g(p['voxels_per_s']).strip()} {e(p['rel_err']).strip()} {'valid' if p['valid'] else 'INVALID'}"
        for k, p in peers.items()) if peers else "torch peers: none ran")
    if best_peer:
        L.append(f"fastest valid peer: {best_peer[0]} {g(best_peer[1]).strip()} Gvoxel/s; engine f16-tc / it: {ratio(vps['f16-tc'], best_peer[1]).strip()}")
    best = vps["f16-tc"]
    goal_speed = best is not None and best >= 1.5e9
    goal_ratio = best is not None and tvps["amp"] is not None and best >= 5 * tvps["amp"]
    L.append(f"goal (H100): fp16 >= 1.5 Gvoxel/s: {'MET' if goal_speed else 'not met'}; >= 5x torch amp: {'MET' if goal_ratio else ('not met' if tvps['amp'] else 'unknown')}")
    if result["infer"]["e2e_voxels_per_s"]:
        L.append(
            f"end-to-end infer --device cuda --fp16 (512x1024x1024 tiff): {g(result['infer']['e2e_voxels_per_s'])} Gvoxel/s incl. I/O, "
            f"{g(result['infer']['e2e_network_voxels_per_s'])} Gvoxel/s tiled network"
        )
    pk = result["peak_mem_bytes"]
    L.append("peak device memory (engine, 256^3): " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in pk.items() if v))
    ts = test_summary or {}
    L.append(
        f"gpu tests: {ts.get('result', 'not run')} ({ts.get('passed', 0)} passed, {ts.get('failed', 0)} failed{': ' + ', '.join(failed_tests) if failed_tests else ''}); "
        f"memcheck errors: {result['memcheck_errors'] if mem else '?'}; racecheck hazards: {result['racecheck_hazards'] if race else '?'}"
    )
    top = sorted((bench.get("f16-tc") or {}).get("kernels", []), key=lambda x: -x["median_ms"])[:6]
    if top:
        L.append("f16-tc slowest kernels: " + ", ".join(f"{x['kernel']} {x['median_ms']:.2f} ms" for x in top))
    if ncu:
        L.append("ncu f16-tc 128^3: " + "; ".join(
            f"{x['kernel']} {x['time_us'] or 0:.0f}us {x['tflops'] or 0:.1f}TF/s {x['dram_gbs'] or 0:.0f}GB/s" for x in ncu[:16]))
    if "step_s" in result["train"]:
        try:
            L.extend(train_lines(result["train"]))
        except Exception as ex:
            L.append(f"training summary failed: {ex!r}")
    else:
        L.append(result["train"].get("error", "no training results"))
    L.append("steps: " + " | ".join(f"{k} {v['status']} {v['seconds'] or 0:.0f}s" for k, v in steps.items()))
    L.append(f"full results: {P('gpu-latest.json')}, logs: {out_dir}/*.log")
    s = "\n".join(L)
    with open(P("summary.txt"), "w") as f:
        f.write(s + "\n")
    print(s)


if __name__ == "__main__":
    main()
