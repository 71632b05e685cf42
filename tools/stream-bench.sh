#!/usr/bin/env bash
# The streaming pipeline of `rln-engine infer` on the CPU (issue 13), measured in one run:
#   - peak host memory (VmHWM, the kernel's high-water mark, from infer --json) at two
#     volume depths 4× apart with the same --memory: bounded memory means they differ
#     by < 20%. The tile core comes from --memory alone (plan::budget_core), so both
#     depths get the same core; choose D1 ≥ 3 cores deep so that it has an interior
#     window too (a volume only 1-2 cores deep has clipped, smaller windows);
#   - end-to-end voxels/s of the real CPU network (infer, depth 4·D1) against the
#     network-only figure of `rln-engine bench --stream-dims` on the same plan (same
#     volume size, core, context, model, threads): the network alone on every tile
#     window, no I/O, measured right before and right after the infer run (their mean:
#     a shared machine's load drifts); overhead = network-only voxels/s ÷ end-to-end
#     voxels/s − 1 (goal < 10%). The run's own compute phase is a second reference;
#   - the same pipeline with the network replaced by a copy (--copy-network, LABELLED:
#     not a deconvolution), the host side's own ceiling.
# Volumes are synthetic (rln-engine psf + synth), Y×X = $SIZE², depths $D1 and 4·$D1,
# converted to OME-Zarr with chunks $CHUNKS (the cores are multiples of them).
# TILE=z,y,x fixes the core instead of --memory. Run it on an otherwise idle machine:
# voxels/s of a loaded one are not comparable (the JSON records the load average).
# Writes bench/results/stream-cpu-latest.json (or $RESULT).
#
#   tools/stream-bench.sh            # a few minutes on 2 cores
#   SIZE=256 D1=192 MEM=1G tools/stream-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RESULT=${RESULT:-bench/results/stream-cpu-latest.json}
MODEL=${MODEL:-models/rln-synthetic-widefield.safetensors}
SIZE=${SIZE:-128}
D1=${D1:-192}
D2=$((4 * D1))
MEM=${MEM:-512M}
CHUNKS=${CHUNKS:-16,64,64}
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
  for d in $D1 $D2; do $B convert "$tmp/in$d.tif" "$tmp/in$d.zarr" --chunks "$CHUNKS" >/dev/null; done
fi

run() { # name depth extra-args...
  local name=$1 d=$2
  shift 2
  echo "== infer $name (depth $d, --memory $MEM, $FMT)" >&2
  local size=(--memory "$MEM")
  [ -n "${TILE:-}" ] && size=(--tile "$TILE")
  $B infer "$MODEL" "$tmp/in$d.$EXT" -o "$tmp/out_$name.$EXT" --device cpu "${size[@]}" --chunks "$CHUNKS" --json "$@" >"$tmp/$name.json"
  rm -rf "$tmp/out_$name.$EXT"
}
# the network-only figure on the plan of the 4x run (the core comes from --memory alone,
# so d1's core is d2's; checked below), measured right before and right after the 4x
# run so that a drifting load on a shared machine affects both alike (NETWORK_BENCH=0
# skips it; the run's own compute phase remains a reference)
netbench() { # name core
  echo "== rln-engine bench --stream-dims $D2,$SIZE,$SIZE --tile $2 (network only)" >&2
  $B bench --stream-dims "$D2,$SIZE,$SIZE" --tile "$2" --model "$MODEL" --min-runs 2 --min-time 0.5 --json >"$tmp/$1.json"
}
core_of() { python3 -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))["core"])))' "$1"; }
run d1 "$D1"
core=$(core_of "$tmp/d1.json")
[ "${NETWORK_BENCH:-1}" = 1 ] && netbench bench_before "$core"
run d2 "$D2"
[ "${NETWORK_BENCH:-1}" = 1 ] && netbench bench_after "$core"
[ "$(core_of "$tmp/d2.json")" = "$core" ] || echo "WARNING: the two depths got different cores" >&2
run copy "$D2" --copy-network

load=$(cut -d' ' -f1-3 /proc/loadavg)

commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src tools || echo "-dirty")
python3 - "$tmp" "$RESULT" "$commit" "$MEM" "$FMT" "$load" <<'PY'
import json, os, platform, sys, datetime
tmp, result, commit, mem, fmt, load = sys.argv[1:7]
L = lambda n: json.load(open(os.path.join(tmp, n + ".json")))
d1, d2, cp = L("d1"), L("d2"), L("copy")
try:
    benches = [L("bench_before"), L("bench_after")]
except (OSError, ValueError):
    benches = []
bench = benches[0] if benches else {"rows": [], "threads": None}
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except (OSError, StopIteration):
    cpu = platform.processor()
rows = [next(r for r in b["rows"] if r["name"].startswith("network-only tiles")) for b in benches]
tiled = None
if rows:
    # the mean of the runs before and after the 4x run
    tiled = dict(rows[0], throughput=sum(r["throughput"] for r in rows) / len(rows),
                 before_and_after=[r["throughput"] for r in rows])
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
    "machine": {"cpu": cpu, "cores": os.cpu_count(), "threads": bench.get("threads"),
                "load_average_before_bench": load},
    "commit": commit,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "memory_arg": mem,
    "format": fmt,
    "depth_1": run(d1),
    "depth_4x": run(d2),
    "copy_network_LABELLED_not_a_deconvolution": run(cp),
    "bench_network_only_tiles": tiled,
}
r["peak_rss_ratio_4x_depth"] = d2["peak_rss_bytes"] / d1["peak_rss_bytes"]
r["bounded_memory_goal_lt_20pct"] = abs(r["peak_rss_ratio_4x_depth"] - 1) < 0.2
if tiled:
    r["pipeline_overhead_vs_network_only"] = tiled["throughput"] / d2["voxels_per_s"] - 1
    r["overhead_goal_lt_10pct"] = r["pipeline_overhead_vs_network_only"] < 0.10
else:
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
    print(f"  network-only ({tiled['name']}): {tiled['throughput'] / 1e6:.3f} Mvoxel/s; "
          f"pipeline overhead {100 * r['pipeline_overhead_vs_network_only']:.1f}% (goal < 10%: {'MET' if r['overhead_goal_lt_10pct'] else 'NOT met'})")
print(f"  load average before the network-only bench: {load}")
print(f"  wrote {result}")
PY
