#!/usr/bin/env bash
# The ONE device call of the CUDA issue: run from the repository root on the GPU machine,
# after tools/gpu-prepare.sh built gpu-bundle/ here (carry it). Every step has its own
# timeout inside a global time budget, logs to $OUT/<step>.log, and a failure never stops
# the script; the last thing printed is the summary table, also written as
# $OUT/summary.txt and $OUT/gpu-latest.json.
#
#   OUT=/some/dir bash tools/gpu-check.sh
#
# Steps, in this order (a step starts only while the budget lasts):
#   env          nvidia-smi, driver, clocks, tools present, bundle manifest, ptxas report
#   gpu_tests    tests/gpu.rs, one process per test: every kernel vs its CPU twin, forward
#                vs CPU (f32/f16/f16-tc, odd sizes, batch), conformance vectors, streaming,
#                determinism with a poisoned workspace, OOM
#   bench_*      engine forward throughput at 256³ (CUDA events, median), per-kernel times,
#                peak memory, host-to-host time
#   predict      authors' model on one 63×95×127 input: every GPU mode vs the CPU engine;
#                the file the PyTorch peer checks against
#   bench_bf16tc the bf16 network (tensor cores) at 256³
#   torch_eager, torch_amp, torch_amp_bf16   the PyTorch peer at 256³ (same weights; BN
#                folded into conv biases, no concat copies, RL nodes in FP32 under
#                autocast), and its prediction vs the engine's and the CPU's on the predict
#                input: each peer's rel_err and valid (finite and ≤ 1e-2) in gpu-latest.json
#   memcheck     compute-sanitizer memcheck on the kernel and forward tests (small sizes)
#   racecheck    compute-sanitizer racecheck (shared memory hazards) on the kernel tests
#   ncu_*        Nsight Compute on one f16-tc forward pass at 128³ (--clock-control none)
#   torch_compile, torch_compile_bf16  AMP + torch.compile(mode="max-autotune") (autotuned
#                Inductor kernels, CUDA graphs; compile time capped by the step timeout)
#   torch_trt    TensorRT through torch_tensorrt when importable (else recorded as absent)
#   conformance  the vectors' inference keys on the GPU (JSON; also part of gpu_tests)
#   infer        end-to-end `rln-engine infer M IN.tif -o OUT.tif --device cuda --fp16` on a
#                256×1024×1024 synthetic volume (read, tiling, normalization, stitching, write)
#   e2e_tiff, e2e_zarr   the streaming pipeline (issue 13) with --json: the 512×1024×1024
#                f32 TIFF → f16 TIFF, and an 8.6 Gvoxel u16 OME-Zarr made here in /dev/shm →
#                f16 OME-Zarr; gpu-latest.json gains `e2e` (phases, peak host/device memory)
#   env_train    what the training steps need: bundle files, torch, a short device query
#   train_tests  tests/gpu_train.rs, one process per test: every training op forward and
#                backward vs the CPU, network gradients (paper, exact, dual-concat),
#                conformance vectors in training mode, steps vs CPU, determinism, checkpoint
#   train_bench  training steps at 4×64³ (CUDA events, median of 40 after 5 warm-up), one
#                profiled step by phase, peak memory; the gradient check file for the peer
#   train_conformance  the vectors' infer/train/grad keys with the network on the GPU (JSON)
#   torch_train_eager, torch_train_amp, torch_train_compile   the PyTorch peer's training
#                step at 4×64³ (eager FP32 also checks its gradients against the engine's)
#   cli_train    `rln-engine train --device cuda` for 600 steps on synthetic data made by
#                the engine (4 volumes 96×128×128 + 1 for validation, every 100 steps):
#                wall time, step rate, extrapolation to the authors' 10 000 steps
#   train_bench_mixed  the same step benchmark with --precision mixed (issue 16 item 3)
#   cli_train_mixed    cli_train with --precision mixed, same seed and data: the validation
#                curve (every 100 steps) next to FP32's; shortened like cli_train to
#                RLN_CLI_TRAIN_STEPS (600, not the recipe's 10 000) to fit the budget
#   cli_train_spread   cli_train in FP32 on another seed (4): the run-to-run spread the
#                mixed curve is compared with (gpu-latest.json train.mixed_validation)
#   summary      the table and gpu-latest.json
#
# The inference part of issue 17 alone: every step has its cap, and no step starts after
# the budget (here 540 s) is spent, so the call ends within 10 minutes with the summary
# (the first run's inference steps took about 2 minutes; the max-autotune compiles are
# the unknown, capped at 150 s and 120 s; a skipped step is listed as such):
#   RLN_GPU_CHECK_BUDGET_S=540 RLN_GPU_STEPS="env gpu_tests bench_f16tc bench_bf16tc bench_f32 bench_f16 predict \
#     torch_eager torch_amp torch_amp_bf16 memcheck racecheck ncu_sol ncu_flops \
#     torch_compile torch_compile_bf16 torch_trt conformance" bash tools/gpu-check.sh
# The training part alone (about 3 minutes before mixed precision; with the mixed
# benchmark and the two extra 600-step CLI runs, each capped at 60 s, about 5.5 minutes;
# budget 540 s keeps it under 10):
#   RLN_GPU_CHECK_BUDGET_S=540 RLN_GPU_STEPS="env_train train_tests train_bench train_bench_mixed \
#     train_conformance torch_train_eager torch_train_amp cli_train cli_train_mixed cli_train_spread \
#     torch_train_compile" bash tools/gpu-check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
B="${RLN_BUNDLE:-$ROOT/gpu-bundle}"
OUT="${OUT:-$ROOT/out/gpu-check}"
SCR="${TMPDIR:-/tmp}/rln-gpu-check.$$"
BUDGET="${RLN_GPU_CHECK_BUDGET_S:-390}"   # seconds for all steps; the summary runs after
DIMS="${RLN_BENCH_DIMS:-1,256,256,256}"
mkdir -p "$OUT" "$SCR"
T0=$(date +%s)
STATUS="$OUT/steps.tsv"
: > "$STATUS"

el() { echo $(($(date +%s) - T0)); }
say() { echo "[gpu-check +$(el)s] $*"; }
find_tool() { # name, then fallback globs
  local n=$1; shift
  command -v "$n" 2>/dev/null && return 0
  local g
  for g in "$@"; do
    for f in $g; do [ -x "$f" ] && echo "$f" && return 0; done
  done
  return 1
}

# step NAME CAP_SECONDS CMD...: runs CMD under timeout into $OUT/NAME.log, records status
step() {
  local name=$1 cap=$2
  shift 2
  # RLN_GPU_STEPS="a b c" runs only those steps (a shorter second call)
  if [ -n "${RLN_GPU_STEPS:-}" ] && [[ " $RLN_GPU_STEPS " != *" $name "* ]]; then
    printf '%s\t%s\t%s\n' "$name" "not selected" 0 >> "$STATUS"
    return 0
  fi
  local left=$((BUDGET - $(el)))
  local t=$cap
  [ "$left" -lt "$t" ] && t=$left
  if [ "$t" -lt 10 ]; then
    say "SKIP $name: time budget spent"
    printf '%s\t%s\t%s\n' "$name" "skipped (budget)" 0 >> "$STATUS"
    return 0
  fi
  say "START $name (timeout ${t}s)"
  if declare -F "$1" > /dev/null; then # a shell function: run it in a child bash
    export -f "$1"
    set -- bash -c "$1"
  fi
  local s rc st
  s=$(date +%s)
  { echo "\$ $*"; timeout -k 10 "$t" "$@"; } > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) st=ok ;;
    124 | 137) st="TIMEOUT(${t}s)" ;;
    *) st="FAIL(rc=$rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$st" $(($(date +%s) - s)) >> "$STATUS"
  say "END   $name: $st in $(($(date +%s) - s))s; last lines:"
  grep -E "FAIL|panicked|error|Error|ERROR SUMMARY|RACECHECK SUMMARY|test result|Gvoxel/s|rel L2 vs|worst|skipped" "$OUT/$name.log" | tail -n 8 | sed 's/^/    /'
  return 0
}

env_info() {
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -a)"
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu,persistence_mode --format=csv || true
  echo "--- tools"
  echo "compute-sanitizer: ${SANITIZER:-missing}"
  echo "ncu: ${NCU:-missing}"
  nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc: missing"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' || echo "torch: missing"
  echo "--- bundle"
  ls -la "$B"
  cat "$B/MANIFEST.json" 2>/dev/null || echo "no MANIFEST.json"
  echo "--- ptxas (registers, spills)"
  cat "$B"/ptxas/*.txt 2>/dev/null | grep -E "Compiling entry|Used|spill" | paste - - - | sed -E 's/ptxas info +: //g' | head -n 60 || true
}

# A test binary, one process per test (--include-ignored: the GPU tests are #[ignore]d so
# that machines without a GPU report them as ignored, not passed): a device fault is sticky for its process, so a
# fault in one test must not fail the others; RLN_CUDA_SYNC=1 names the faulting kernel.
# Usage: tests_each BINARY PER_TEST_TIMEOUT_S
tests_each() {
  local bin=$1 limit=$2 names t rc pass=0 fail=0
  names=$("$bin" --list 2>/dev/null | sed -n 's/: test$//p')
  [ -n "$names" ] || { echo "no tests listed by $bin"; return 2; }
  for t in $names; do
    echo "===== $t"
    RLN_CUDA_SYNC=1 timeout -k 5 "$limit" "$bin" "$t" --exact --include-ignored --nocapture --test-threads=1
    rc=$?
    if [ $rc -eq 0 ]; then
      pass=$((pass + 1)); echo "TEST $t: ok"
    else
      fail=$((fail + 1)); echo "TEST $t: FAILED (rc=$rc)"
    fi
  done
  echo "test result: $([ $fail -eq 0 ] && echo ok || echo FAILED). $pass passed; $fail failed (one process per test)"
  [ $fail -eq 0 ]
}
gpu_tests_each() { tests_each "$TESTS" 70; }

SANITIZER=$(find_tool compute-sanitizer /usr/local/cuda/bin/compute-sanitizer "/usr/local/cuda-*/bin/compute-sanitizer" "/opt/nvidia/*/compute-sanitizer/compute-sanitizer") || SANITIZER=""
NCU=$(find_tool ncu /usr/local/cuda/bin/ncu "/opt/nvidia/nsight-compute/*/ncu" "/usr/local/cuda-*/bin/ncu") || NCU=""
TESTS="$B/gpu_tests"
TOOL="$B/gpu_tool"
MODEL="$B/authors.safetensors"
PEER="python3 $ROOT/tools/peers/rln_torch.py"
export RLN_REQUIRE_GPU=1 RLN_REFERENCE_DIR="$B/reference"
export B OUT SCR MODEL SANITIZER NCU TESTS TOOL

say "rln-engine GPU check: bundle $B, output $OUT, budget ${BUDGET}s"
step env 30 env_info
step gpu_tests 150 gpu_tests_each
step bench_f16tc 60 "$TOOL" bench --mode f16-tc --dims "$DIMS" --reps 20 --json "$OUT/bench_f16-tc.json"
step bench_f32 75 "$TOOL" bench --mode f32 --dims "$DIMS" --reps 10 --json "$OUT/bench_f32.json"
step bench_f16 60 "$TOOL" bench --mode f16 --dims "$DIMS" --reps 10 --json "$OUT/bench_f16.json"
step bench_bf16tc 45 "$TOOL" bench --mode bf16-tc --dims "$DIMS" --reps 20 --json "$OUT/bench_bf16-tc.json"
step predict 60 "$TOOL" predict --model "$MODEL" --dims 1,63,95,127 --out "$SCR/pred.safetensors" --json "$OUT/predict.json"
step torch_eager 90 $PEER --model "$MODEL" --mode eager --dims "$DIMS" --reps 5 --check "$SCR/pred.safetensors" --json "$OUT/torch_eager.json"
step torch_amp 90 $PEER --model "$MODEL" --mode amp --dims "$DIMS" --reps 10 --check "$SCR/pred.safetensors" --json "$OUT/torch_amp.json"
step torch_amp_bf16 60 $PEER --model "$MODEL" --mode amp_bf16 --dims "$DIMS" --reps 10 --check "$SCR/pred.safetensors" --json "$OUT/torch_amp_bf16.json"
if [ -n "$SANITIZER" ]; then
  step memcheck 75 env RLN_GPU_TEST_QUICK=1 "$SANITIZER" --tool memcheck --error-exitcode 99 "$TESTS" every_conv_kernel up2_and forward_matches --include-ignored --test-threads=1
  step racecheck 75 env RLN_GPU_TEST_QUICK=1 "$SANITIZER" --tool racecheck --racecheck-report hazard --error-exitcode 99 "$TESTS" every_conv_kernel --include-ignored --test-threads=1
else
  say "SKIP memcheck, racecheck: compute-sanitizer not found"
  printf 'memcheck\tskipped (no compute-sanitizer)\t0\nracecheck\tskipped (no compute-sanitizer)\t0\n' >> "$STATUS"
fi
if [ -n "$NCU" ]; then
  # the first 16 launches are one whole forward pass (16 kernels); time, DRAM, SOL
  step ncu_sol 60 "$NCU" --clock-control none -c 16 --csv --page raw --print-units base \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active \
    "$TOOL" bench --mode f16-tc --dims 1,128,128,128 --reps 1
  # instruction counts: FLOP = 2·FFMA (thread level) + 4096·HMMA.16816 (warp level)
  step ncu_flops 60 "$NCU" --clock-control none -c 16 --csv --page raw --print-units base \
    --metrics gpu__time_duration.sum,smsp__sass_thread_inst_executed_op_ffma_pred_on.sum,sm__inst_executed_pipe_tensor_op_hmma.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum \
    "$TOOL" bench --mode f16-tc --dims 1,128,128,128 --reps 1
else
  say "SKIP ncu: not found"
  printf 'ncu_sol\tskipped (no ncu)\t0\n' >> "$STATUS"
fi
# torch.compile compiles for a minute or more: after the sanitizers and ncu
step torch_compile 150 $PEER --model "$MODEL" --mode compile --dims "$DIMS" --reps 10 --check "$SCR/pred.safetensors" --json "$OUT/torch_compile.json"
step torch_compile_bf16 120 $PEER --model "$MODEL" --mode compile_bf16 --dims "$DIMS" --reps 10 --check "$SCR/pred.safetensors" --json "$OUT/torch_compile_bf16.json"
step torch_trt 90 $PEER --model "$MODEL" --mode trt --dims "$DIMS" --reps 10 --check "$SCR/pred.safetensors" --json "$OUT/torch_trt.json"
step cli_bench 40 "$B/rln-engine" bench --device cuda --fp16
step cli_conformance 40 "$B/rln-engine" conformance --device cuda --model "$MODEL" --vectors "$B/reference/rln-tf-vectors-a.safetensors"
step conformance 40 "$TOOL" conformance --model "$MODEL" --vectors "$B/reference/rln-tf-vectors-a.safetensors" --json "$OUT/conformance.json"
infer_e2e() {
  # end to end: TIFF read, normalization, tiling, GPU, stitching, TIFF write (f16 output)
  "$B/rln-engine" infer --help > /dev/null || return 3
  python3 -c "
import numpy as np, tifffile
rng = np.random.default_rng(0)
v = rng.random((512, 1024, 1024), dtype=np.float32) * 100 + 10
tifffile.imwrite('$SCR/vol.tif', v, bigtiff=True)
print('wrote', v.shape)" || return 4
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$SCR/mem.txt" 2>/dev/null &
  local smi=$! t0 t1 rc
  t0=$(date +%s.%N)
  "$B/rln-engine" infer ${INFER_ARGS:-$MODEL $SCR/vol.tif -o $SCR/out.tif --device cuda --fp16 --output-dtype f16}
  rc=$?
  t1=$(date +%s.%N)
  kill $smi 2>/dev/null
  [ $rc -eq 0 ] || return 5
  ls -la "$SCR/out.tif"
  python3 -c "t = $t1 - $t0; print(f'INFER_E2E voxels/s {512*1024*1024 / t:.4e} ({t:.2f} s for 512x1024x1024, TIFF read and write included)')"
  echo "INFER_PEAK_GPU_MEMORY_MIB $(sort -n "$SCR/mem.txt" | tail -n 1)"
}
if "$B/rln-engine" infer --help 2>/dev/null | grep -q -- "--device"; then
  step infer 120 infer_e2e
else
  say "SKIP infer: this rln-engine has no 'infer --device' yet"
  printf 'infer\tskipped (no infer --device in the CLI)\t0\n' >> "$STATUS"
fi

# e2e (issue 13): the streaming pipeline with --json, volumes made here in tmpfs/page cache.
#   e2e_tiff  the 512×1024×1024 f32 TIFF above → f16 TIFF (goal ≤ 3 s)
#   e2e_zarr  a RLN_E2E_ZARR_DIMS (default 2048×2048×2048 = 8.6 Gvoxel) u16 OME-Zarr →
#             f16 OME-Zarr, --fp16 (goal ≥ 1 Gvoxel/s, peak host memory ≤ 16 GB)
# Each writes $OUT/e2e_<name>.json (infer's summary plus the GPU memory peak seen by
# nvidia-smi); gpu_summary.py turns them into the `e2e` object of gpu-latest.json.
E2E_DIR="${RLN_E2E_DIR:-/dev/shm/rln-e2e.$$}"
e2e_run() { # name, then infer's arguments
  local name=$1 smi rc
  shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$SCR/mem_$name.txt" 2>/dev/null &
  smi=$!
  "$B/rln-engine" infer "$@" --device cuda --fp16 --json > "$SCR/e2e_$name.raw.json"
  rc=$?
  kill $smi 2>/dev/null
  [ $rc -eq 0 ] || return 5
  python3 - "$SCR/e2e_$name.raw.json" "$SCR/mem_$name.txt" "$OUT/e2e_$name.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
try:
    peak = max(int(l) for l in open(sys.argv[2]) if l.strip()) * 2**20
except (OSError, ValueError):
    peak = None
s["peak_device_bytes"] = s.get("peak_device_bytes") or peak
json.dump(s, open(sys.argv[3], "w"), indent=1)
print(f"E2E {sys.argv[3]}: {s['voxels']} voxels in {s['seconds']:.2f} s = {s['voxels_per_s'] / 1e9:.3f} Gvoxel/s, peak host {s['peak_rss_bytes'] / 1e9:.2f} GB")
PY
}
e2e_tiff() {
  [ -f "$SCR/vol.tif" ] || python3 -c "
import numpy as np, tifffile
rng = np.random.default_rng(0)
v = rng.random((512, 1024, 1024), dtype=np.float32) * 100 + 10
tifffile.imwrite('$SCR/vol.tif', v, bigtiff=True)" || return 4
  rm -f "$SCR/e2e_out.tif"
  e2e_run tiff "$MODEL" "$SCR/vol.tif" -o "$SCR/e2e_out.tif" --output-dtype f16
}
e2e_zarr() {
  mkdir -p "$E2E_DIR" || return 4
  python3 - "$E2E_DIR/in.ome.zarr" "${RLN_E2E_ZARR_DIMS:-2048,2048,2048}" <<'PY' || return 4
# a u16 OME-Zarr (NGFF 0.4) with smooth structure and noise, written slab by slab
import sys, numpy as np, zarr
from ome_zarr.io import parse_url
from ome_zarr.writer import write_multiscales_metadata
path, dims = sys.argv[1], tuple(int(v) for v in sys.argv[2].split(","))
root = zarr.open_group(path, mode="w", zarr_format=2)
a = root.create_array("0", shape=dims, chunks=(128, 128, 128), dtype="u2", overwrite=True)
rng = np.random.default_rng(0)
yy, xx = np.meshgrid(np.arange(dims[1]), np.arange(dims[2]), indexing="ij")
base = (200 + 300 * (np.sin(yy / 37.0) * np.cos(xx / 53.0)) ** 2).astype(np.float32)
for z0 in range(0, dims[0], 128):
    n = min(128, dims[0] - z0)
    slab = base[None] * (1 + 0.5 * np.sin((z0 + np.arange(n)) / 29.0))[:, None, None]
    slab += rng.normal(0, 10, size=(n,) + dims[1:]).astype(np.float32)
    a[z0:z0 + n] = np.clip(slab, 0, 65535).astype(np.uint16)
write_multiscales_metadata(root, datasets=[{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}], axes=["z", "y", "x"])
print("wrote", path, dims)
PY
  rm -rf "$E2E_DIR/out.ome.zarr"
  e2e_run zarr "$MODEL" "$E2E_DIR/in.ome.zarr" -o "$E2E_DIR/out.ome.zarr" --output-dtype f16
  local rc=$?
  rm -rf "$E2E_DIR"
  return $rc
}
if "$B/rln-engine" infer --help 2>/dev/null | grep -q -- "--json"; then
  step e2e_tiff 90 e2e_tiff
  step e2e_zarr 300 e2e_zarr
else
  printf 'e2e_tiff\tskipped (no infer --json)\t0\ne2e_zarr\tskipped (no infer --json)\t0\n' >> "$STATUS"
fi

# ---------------------------------------------------------------- training
TRAIN_TESTS="$B/gpu_train_tests"
TRAIN_DIMS="${RLN_TRAIN_DIMS:-4,64,64,64}"
export TRAIN_TESTS TRAIN_DIMS
env_train() {
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit --format=csv || true
  ls -la "$B/gpu_train_tests" "$B/gpu_tool" "$B/rln-engine" "$B/psf.tif" || true
  grep -E '"commit"|"dirty_files"|"built"' "$B/MANIFEST.json" || true
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' || echo "torch: missing"
  echo "--- ptxas (training kernels)"
  cat "$B"/ptxas/train_*.txt 2>/dev/null | grep -E "Compiling entry|Used|spill" | paste - - - | sed -E 's/ptxas info +: //g' || true
}
train_tests_each() { tests_each "$TRAIN_TESTS" 60; }
cli_train() { # [name] [extra flags...]: the FP32 run is cli_train, seed 3
  local name=${1:-cli_train} t0 t1 rc
  [ $# -gt 0 ] && shift
  t0=$(date +%s.%N)
  "$B/rln-engine" train --device cuda --synth-psf "$B/psf.tif" --synth-count 4 --synth-val-count 1 \
    --synth-size 96,128,128 --steps "${RLN_CLI_TRAIN_STEPS:-600}" --epoch-steps 100 --seed 3 \
    -o "$SCR/$name.safetensors" --log "$OUT/$name.jsonl" "$@"
  rc=$?
  t1=$(date +%s.%N)
  python3 -c "print(f'CLI_TRAIN_WALL_S {$t1 - $t0:.2f}')"
  return $rc
}
cli_train_mixed() { cli_train cli_train_mixed --precision mixed; }
cli_train_spread() { cli_train cli_train_spread --seed 4; }
export -f cli_train # called by the two above in step's child bash
step env_train 20 env_train
step train_tests 100 train_tests_each
step train_bench 60 "$TOOL" train-bench --dims "$TRAIN_DIMS" --warmup 5 --steps 40 --json "$OUT/train_bench.json" --check-out "$SCR/train_check.safetensors"
step train_bench_mixed 45 "$TOOL" train-bench --precision mixed --dims "$TRAIN_DIMS" --warmup 5 --steps 40 --json "$OUT/train_bench_mixed.json"
step train_conformance 30 "$TOOL" train-conformance --model "$MODEL" --vectors "$B/reference/rln-tf-vectors-a.safetensors" --json "$OUT/train_conformance.json"
TCHK="$SCR/train_check.safetensors"
if [ -f "$TCHK" ]; then TMODEL="$TCHK"; else TMODEL="$MODEL"; TCHK=""; fi
step torch_train_eager 50 $PEER --train --model "$TMODEL" --mode eager --dims "$TRAIN_DIMS" --warmup 3 --reps 10 ${TCHK:+--check "$TCHK"} --json "$OUT/torch_train_eager.json"
step torch_train_amp 40 $PEER --train --model "$TMODEL" --mode amp --dims "$TRAIN_DIMS" --warmup 3 --reps 10 --json "$OUT/torch_train_amp.json"
step cli_train 60 cli_train
step cli_train_mixed 60 cli_train_mixed
step cli_train_spread 60 cli_train_spread
# compilation of forward and backward takes a minute or more: last, capped
step torch_train_compile 80 $PEER --train --model "$TMODEL" --mode compile --dims "$TRAIN_DIMS" --warmup 2 --reps 10 --json "$OUT/torch_train_compile.json"

say "summary"
python3 "$ROOT/tools/gpu_summary.py" "$OUT" "$B" 2>&1 | tee "$OUT/summary.log" || say "summary failed: see $OUT/summary.log"
rm -rf "$SCR"
# the device tool returns at most 8 files: keep the summary and JSON, pack every log
( cd "$OUT" && tar czf "$SCR.logs.tar.gz" --exclude='gpu-latest.json' --exclude='summary.txt' . && \
  find . -mindepth 1 -maxdepth 1 ! -name gpu-latest.json ! -name summary.txt ! -name steps.tsv -exec rm -rf {} + && \
  mv "$SCR.logs.tar.gz" logs.tar.gz )
ls -la "$OUT"
