#!/usr/bin/env bash
# Builds, on this (GPU-less) machine, everything tools/gpu-check.sh needs on the GPU
# machine (which has no Rust), into gpu-bundle/ (git-ignored; carry it with the run):
#   rln-engine        the release CLI (import-tf; infer --device cuda once it exists)
#   gpu_tool          examples/gpu_tool.rs: CUDA bench, predictions for the PyTorch peer, conformance
#   gpu_tests         the tests/gpu.rs binary
#   gpu_train_tests   the tests/gpu_train.rs binary (CUDA training backend vs CPU)
#   psf.tif           a small widefield PSF for the CLI training run (train --synth-psf)
#   authors.safetensors   the authors' weights imported as an rln-engine model (div_eps 1e-4)
#   reference/        the conformance vectors and the authors' weights (from ../shared/reference)
#   ptxas/            the ptxas resource reports of every kernel module
#   MANIFEST.json     commit, date, sizes
# Usage: tools/gpu-prepare.sh     (from anywhere; ends with the bundle's size)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
B="$ROOT/gpu-bundle"
REF="${RLN_REFERENCE_DIR:-$ROOT/../shared/reference}"
export RLN_REQUIRE_NVCC=1   # every kernel compiled by nvcc (sm_90 cubin + compute_80 PTX)

echo "== building (release): rln-engine, gpu_tool, tests/gpu.rs"
cargo build --release --bin rln-engine
cargo build --release --example gpu_tool
test_exe() { # the executable of integration test $1, built in release
  cargo test --release --test "$1" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1"
}
TEST_EXE=$(test_exe gpu)
[ -x "$TEST_EXE" ] || { echo "gpu-prepare: could not find the tests/gpu.rs executable" >&2; exit 1; }
TRAIN_TEST_EXE=$(test_exe gpu_train)
[ -x "$TRAIN_TEST_EXE" ] || { echo "gpu-prepare: could not find the tests/gpu_train.rs executable" >&2; exit 1; }

rm -rf "$B"
mkdir -p "$B/reference" "$B/ptxas"
cp target/release/rln-engine "$B/rln-engine"
cp target/release/examples/gpu_tool "$B/gpu_tool"
cp "$TEST_EXE" "$B/gpu_tests"
cp "$TRAIN_TEST_EXE" "$B/gpu_train_tests"
if command -v strip >/dev/null; then
  strip "$B/rln-engine" "$B/gpu_tool" "$B/gpu_tests" "$B/gpu_train_tests"
fi

echo "== importing the authors' model"
"$B/rln-engine" import-tf "$REF/rln-authors-weights.safetensors" --div-eps 1e-4 -o "$B/authors.safetensors"
cp "$REF/rln-tf-vectors-a.safetensors" "$REF/rln-authors-weights.safetensors" "$B/reference/"
echo "== a widefield PSF for the CLI training run"
"$B/rln-engine" psf -o "$B/psf.tif" --nx 15 --nz 13 --dxy 0.1 --dz 0.2 --na 1.2 --ns 1.515 > /dev/null

# the ptxas reports of the build the binaries embed (the newest OUT_DIR holding them)
OUTDIR=$(ls -td target/release/build/rln-engine-*/out 2>/dev/null | while read -r d; do [ -f "$d/kernels.rs" ] && echo "$d"; done | head -n 1 || true)
[ -n "$OUTDIR" ] && cp "$OUTDIR"/*.ptxas.txt "$B/ptxas/"

COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
DIRTY=$(git status --porcelain 2>/dev/null | awk 'substr($0, 1, 2) != "??"' | wc -l)
python3 - "$B" "$COMMIT" "$DIRTY" <<'EOF'
import json, os, sys, datetime
b, commit, dirty = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = {}
for root, _, names in os.walk(b):
    for n in names:
        p = os.path.join(root, n)
        files[os.path.relpath(p, b)] = os.path.getsize(p)
json.dump({"commit": commit, "dirty_files": dirty, "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "files": files, "total_bytes": sum(files.values())}, open(os.path.join(b, "MANIFEST.json"), "w"), indent=1)
EOF
TOTAL=$(du -sb "$B" | cut -f1)
echo "== gpu-bundle/: $((TOTAL / 1024 / 1024)) MiB ($TOTAL bytes), commit $COMMIT$([ "$DIRTY" -gt 0 ] && echo ' (uncommitted changes!)')"
ls -la "$B"
if [ "$TOTAL" -gt $((45 * 1024 * 1024)) ]; then
  echo "gpu-prepare: the bundle exceeds 45 MiB" >&2
  exit 1
fi
