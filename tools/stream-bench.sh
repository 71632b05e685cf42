#!/usr/bin/env bash
# The streaming pipeline of `rln-engine infer` on the CPU (issue 13), measured in one run:
#   - peak host memory (VmHWM, from infer --json) at two volume depths 4× apart with the
#     same --memory: bounded memory means they differ by < 20%;
#   - end-to-end voxels/s of the real CPU network against the network-only figures:
#     (a) the predictor's own time inside the same run (phases.compute), so
#         overhead = seconds / compute − 1 (goal < 10%), and
#     (b) the tiled-inference row of `rln-engine bench` (in-memory, blended tiles);
#   - the same pipeline with the network replaced by a copy (--copy-network, LABELLED:
#     not a deconvolution), the host side's own ceiling.
# Volumes are synthetic (rln-engine psf + synth), Y×X = $SIZE², depths $D1 and 4·$D1.
# Input/output format: OME-Zarr when `rln-engine convert` exists (the streaming readers),
# else TIFF (read whole by the temporary adapter: memory then grows with depth).
# Writes bench/results/stream-cpu-latest.json (or $RESULT).
#
#   tools/stream-bench.sh            # ~3 min on 2 cores
#   SIZE=512 D1=32 MEM=2G tools/stream-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RESULT=${RESULT:-bench/results/stream-cpu-latest.json}
MODEL=${MODEL:-models/rln-synthetic-widefield.safetensors}
SIZE=${SIZE:-256}
D1=${D1:-16}
D2=$((4 * D1))
MEM=${MEM:-1G}
cargo build --release --quiet
B=target/release/rln-engine
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== volumes ${D1}×${SIZE}×${SIZE} and ${D2}×${SIZE}×${SIZE}" >&2
$B psf --model gaussian --fwhm 0.8,0.3,0.3 -o "$tmp/psf.tif" >/dev/null
for d in $D1 $D2; do
  $B synth --psf "$tmp/psf.tif" --size "$d,$SIZE,$SIZE" --seed 5 -o "$tmp/s$d" >/dev/null
  mv "$tmp/s$d/input/synth_0000.tif" "$tmp/in$d.tif"
done
FMT=tiff
EXT=tif
if $B convert --help >/dev/null 2>&1; then
  FMT=ome-zarr
  EXT=zarr
  for d in $D1 $D2; do $B convert "$tmp/in$d.tif" "$tmp/in$d.zarr" >/dev/null; done
fi

run() { # name depth extra-args...
  local name=$1 d=$2
  shift 2
  echo "== infer $name (depth $d, --memory $MEM, $FMT)" >&2
  $B infer "$MODEL" "$tmp/in$d.$EXT" -o "$tmp/out_$name.$EXT" --device cpu --memory "$MEM" --json "$@" >"$tmp/$name.json"
  rm -rf "$tmp/out_$name.$EXT"
}
run d1 "$D1"
run d2 "$D2"
run copy "$D2" --copy-network

echo "== rln-engine bench (network-only tiled inference)" >&2
$B bench --json --min-time 0.5 --min-runs 1 >"$tmp/bench.json"

commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src tools || echo "-dirty")
python3 - "$tmp" "$RESULT" "$commit" "$MEM" "$FMT" <<'PY'
import json, os, platform, sys, datetime
tmp, result, commit, mem, fmt = sys.argv[1:6]
L = lambda n: json.load(open(os.path.join(tmp, n + ".json")))
d1, d2, cp, bench = L("d1"), L("d2"), L("copy"), L("bench")
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except (OSError, StopIteration):
    cpu = platform.processor()
tiled = next((r for r in bench["rows"] if r["name"].startswith("tiled inference")), None)
def run(s):
    p = s["phases"]
    return {
        "dims": s["dims"], "voxels": s["voxels"], "seconds": s["seconds"], "voxels_per_s": s["voxels_per_s"],
        "tiles": s["tiles"], "core": s["core"], "window": s["window"], "peak_rss_bytes": s["peak_rss_bytes"],
        "phases": p, "network_only_voxels_per_s": s["voxels"] / p["compute"] if p["compute"] else None,
        "overhead_vs_own_compute": s["seconds"] / p["compute"] - 1 if p["compute"] else None,
        "format_in": s["format_in"], "format_out": s["format_out"],
    }
r = {
    "machine": {"cpu": cpu, "cores": os.cpu_count(), "threads": bench.get("threads")},
    "commit": commit,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "memory_arg": mem,
    "format": fmt,
    "depth_1": run(d1),
    "depth_4x": run(d2),
    "copy_network_LABELLED_not_a_deconvolution": run(cp),
    "bench_tiled_inference": tiled,
}
r["peak_rss_ratio_4x_depth"] = d2["peak_rss_bytes"] / d1["peak_rss_bytes"]
r["bounded_memory_goal_lt_20pct"] = abs(r["peak_rss_ratio_4x_depth"] - 1) < 0.2
if tiled:
    r["e2e_over_bench_tiled"] = d2["voxels_per_s"] / tiled["throughput"]
r["overhead_goal_lt_10pct"] = r["depth_4x"]["overhead_vs_own_compute"] < 0.10
os.makedirs(os.path.dirname(result) or ".", exist_ok=True)
json.dump(r, open(result, "w"), indent=1)
g = lambda b: f"{b / 1e9:.3f} GB"
print(f"streaming inference on {cpu} ({os.cpu_count()} cores), {fmt}, --memory {mem}, commit {commit}")
for k in ("depth_1", "depth_4x", "copy_network_LABELLED_not_a_deconvolution"):
    x = r[k]
    print(f"  {k:<44} {x['dims']} {x['tiles']:>3} tiles  {x['voxels_per_s'] / 1e6:8.3f} Mvoxel/s  peak {g(x['peak_rss_bytes'])}  "
          f"overhead vs own compute {100 * x['overhead_vs_own_compute']:.1f}%")
print(f"  peak RSS ratio (4x depth / 1x): {r['peak_rss_ratio_4x_depth']:.3f}  (goal: within 20%: {'MET' if r['bounded_memory_goal_lt_20pct'] else 'NOT met'})")
if tiled:
    print(f"  rln-engine bench tiled inference: {tiled['throughput'] / 1e6:.3f} Mvoxel/s; end-to-end / bench = {r['e2e_over_bench_tiled']:.3f}")
print(f"  wrote {result}")
PY
