#!/usr/bin/env bash
# The CPU benchmark with its peers, measured in one run on this machine:
#   - the engine: `rln-engine bench --json` (network forward 4×64³ and 128³, one training
#     step 4×64³, tiled inference 256³, Richardson–Lucy 64×256×256 with a 31³ PSF);
#   - PyTorch (tools/peers/rln_torch.py, eager FP32 on the CPU, same thread count) on the
#     same model and shapes: forward 4×64³, forward 1×128³, training step 4×64³;
#   - scikit-image's richardson_lucy on the engine's RLD benchmark volume and PSF.
# Writes bench/results/cpu-latest.json (or $RESULT) and prints a table.
#
#   pip install torch scikit-image    # the peers; a missing peer is reported, not fatal
#   tools/cpu-bench.sh
# Run it on an otherwise idle machine: both sides use every core.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULT=${RESULT:-bench/results/cpu-latest.json}
MODEL=${MODEL:-models/rln-synthetic-widefield.safetensors}
THREADS=${THREADS:-$(nproc)}
cargo build --release --quiet
B=target/release/rln-engine
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== engine ($THREADS threads)" >&2
$B --threads "$THREADS" bench --json >"$tmp/engine.json"

peer() { # name, then the command; a failing peer leaves an error record
    local name=$1
    shift
    echo "== $name" >&2
    if ! "$@" >"$tmp/$name.log" 2>&1; then
        echo "{\"error\": \"$(tail -c 300 "$tmp/$name.log" | tr -d '"\\\n')\"}" >"$tmp/$name.json"
    fi
    tail -n 2 "$tmp/$name.log" >&2 || true
}
export OMP_NUM_THREADS=$THREADS
T="python3 tools/peers/rln_torch.py --model $MODEL --device cpu --mode eager --warmup 1"
peer torch_fwd_4x64 $T --dims 4,64,64,64 --reps 5 --json "$tmp/torch_fwd_4x64.json"
peer torch_fwd_128 $T --dims 1,128,128,128 --reps 5 --json "$tmp/torch_fwd_128.json"
peer torch_train $T --train --dims 4,64,64,64 --reps 5 --json "$tmp/torch_train.json"
echo "== skimage richardson_lucy" >&2
if python3 tools/imaging/rl_peer_bench.py 10 >"$tmp/skimage.json" 2>"$tmp/skimage.log"; then :; else
    echo '{"error": "skimage peer failed (pip install scikit-image)"}' >"$tmp/skimage.json"
fi

python3 - "$tmp" "$RESULT" <<'EOF'
import json, os, subprocess, sys, datetime
tmp, result = sys.argv[1], sys.argv[2]
load = lambda n: json.load(open(os.path.join(tmp, n)))
eng = load("engine.json")
rows = {r["name"]: r for r in eng["rows"]}
def find(prefix):
    for name, r in rows.items():
        if name.startswith(prefix):
            return r
    return None
def peer_rate(n, key="voxels_per_s"):
    try:
        return load(n).get(key)
    except Exception:
        return None
pairs = [
    ("forward 4x64^3", find("forward 4×64×64×64"), peer_rate("torch_fwd_4x64.json"), "torch eager fp32"),
    ("forward 1x128^3", find("forward 1×128×128×128"), peer_rate("torch_fwd_128.json"), "torch eager fp32"),
    ("train step 4x64^3", find("train step"), peer_rate("torch_train.json"), "torch eager fp32"),
    ("richardson-lucy 64x256x256", find("Richardson"), peer_rate("skimage.json", "voxel_iterations_per_s"), "skimage"),
]
out = {
    "machine": eng["device"], "threads": eng["threads"], "isa": eng["isa"],
    "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "engine": eng, "peers": {}, "ratios": {},
}
for n in ["torch_fwd_4x64", "torch_fwd_128", "torch_train", "skimage"]:
    try:
        out["peers"][n] = load(n + ".json")
    except Exception as e:
        out["peers"][n] = {"error": str(e)}
print(f"CPU benchmark: {eng['device']}, {eng['threads']} threads, {eng['isa']}")
print(f"{'case':28} {'engine':>14} {'peer':>14}  ratio  peer")
for label, r, p, pname in pairs:
    if r is None:
        continue
    e = r["throughput"]
    ratio = e / p if p else None
    out["ratios"][label] = ratio
    gf = f"  ({r['gflops']:.1f} GFLOP/s)" if r.get("gflops") else ""
    print(f"{label:28} {e:14.4g} {p if p else float('nan'):14.4g}  {ratio if ratio else float('nan'):5.2f}x {pname}  [{r['unit']}]{gf}")
for name, r in rows.items():
    if not any(r is x[1] for x in pairs):
        gf = f"  ({r['gflops']:.1f} GFLOP/s)" if r.get("gflops") else ""
        print(f"{name:28} {r['throughput']:14.4g} {'':14}  {'':6} {'':16} [{r['unit']}]{gf}")
os.makedirs(os.path.dirname(result) or ".", exist_ok=True)
with open(result + ".tmp", "w") as f:
    json.dump(out, f, indent=1)
os.replace(result + ".tmp", result)
print(f"wrote {result}")
EOF
