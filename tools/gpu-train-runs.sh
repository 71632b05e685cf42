#!/usr/bin/env bash
# One device call that trains candidates for the shipped model with the authors' full
# recipe (10 000 steps of 4×64³ crops, their learning-rate schedule) on the GPU machine,
# several runs at once on the one GPU, and brings back every checkpoint's model for selection on
# the CPU here (tools never pick a model by its test-set result: see models/README.md).
# Build first with tools/gpu-prepare.sh and carry gpu-bundle/.
#
#   OUT=/some/dir bash tools/gpu-train-runs.sh
#
# Runs (same data: 32 synthetic volumes of 128³ for the shipped model's PSF, filaments
# left out, 4 validation volumes; seed 7 unless named):
#   gs5    family subsets 1/2                      (the CPU run ff7k, taken to 10 000)
#   ga     all families in every volume            (the authors' data recipe)
#   gf5    family subsets 1/2, input-flux targets
#   gs5b   family subsets 1/2, seed 11
# RLN_RUNS replaces that list: "name=flags;name=flags;..." (first = highest priority).
# After RLN_CHECK_AT_S seconds of training the step rate is measured; if all runs cannot
# finish by the budget, all but the first two are stopped so that those can.
# $OUT gets: env.txt, train_tests.log, one <run>.tar per run (the model every 500 steps
# as <run>.step<N>.safetensors from train --keep-checkpoints, the log, the final and best
# models), status.txt.
set -u -o pipefail
cd "$(dirname "$0")/.."
B="${RLN_BUNDLE:-gpu-bundle}"
OUT="${OUT:-out/gpu-train-runs}"
BUDGET="${RLN_TRAIN_BUDGET_S:-530}"
CHECK_AT="${RLN_CHECK_AT_S:-110}"
STEPS="${RLN_TRAIN_STEPS:-10000}"
DEVICE="${RLN_TRAIN_DEVICE:-cuda}"   # cpu: a dry run of this script on a machine without a GPU
EVERY="${RLN_CHECKPOINT_EVERY:-500}"
W=/tmp/rln-train-runs
rm -rf "$W"
mkdir -p "$OUT" "$W"
T0=$(date +%s)
el() { echo $(($(date +%s) - T0)); }
say() { echo "[train-runs +$(el)s] $*" | tee -a "$OUT/status.txt"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nproc
  cat "$B/MANIFEST.json" | head -5
} > "$OUT/env.txt" 2>&1
say "$(head -2 "$OUT/env.txt" | tail -1)"

# the shipped model's PSF, regenerated from its metadata
"$B/rln-engine" psf --from-model models/rln-synthetic-widefield.safetensors -o "$W/psf.tif" > /dev/null ||
  { say "psf --from-model failed"; exit 1; }

COMMON=(--device "$DEVICE" --synth-psf "$W/psf.tif" --synth-count 32 --synth-val-count 4
  --synth-size 128,128,128 --exclude-family filaments --percentiles 0.01,99.9
  --steps "$STEPS" --epoch-steps "$EVERY" --checkpoint-every "$EVERY" --keep-checkpoints --threads 4)
declare -A PID
launch() { # name, extra flags
  local name=$1
  shift
  "$B/rln-engine" train "${COMMON[@]}" "$@" -o "$W/$name.safetensors" --log "$W/$name.log.jsonl" \
    > "$W/$name.out" 2>&1 &
  PID[$name]=$!
  say "launched $name (pid ${PID[$name]}): $*"
}
RUNS="${RLN_RUNS:-gs5=--synth-family-subsets --seed 7;ga=--seed 7;gf5=--synth-family-subsets --target-scale input-flux --seed 7;gs5b=--synth-family-subsets --seed 11}"
IFS=';' read -ra ENTRIES <<< "$RUNS"
NAMES=()
for e in "${ENTRIES[@]}"; do
  # shellcheck disable=SC2086 # the flags are words
  launch "${e%%=*}" ${e#*=}
  NAMES+=("${e%%=*}")
done
FIRST=${NAMES[0]}
SECOND=${NAMES[1]:-${NAMES[0]}}

# the CUDA training tests (GPU vs CPU gradients, conformance in training mode) beside them
(RLN_REFERENCE_DIR="$B/reference" timeout 120 "$B/gpu_train_tests" --test-threads 2 > "$OUT/train_tests.log" 2>&1; echo "exit $?" >> "$OUT/train_tests.log") &

last_step() { # the newest training step in a run's log
  tail -n 3 "$W/$1.log.jsonl" 2>/dev/null | grep -o '"step":[0-9]*' | tail -n 1 | cut -d: -f2
}
alive() { kill -0 "${PID[$1]}" 2>/dev/null; }

checked=0
while :; do
  sleep 5
  any=0
  for n in "${!PID[@]}"; do alive "$n" && any=1; done
  [ $any -eq 0 ] && { say "all runs ended"; break; }
  if [ "$(el)" -ge 45 ] && ! alive "$FIRST" && ! alive "$SECOND"; then
    say "$FIRST and $SECOND both ended early: stopping (see their .out)"
    break
  fi
  if [ $checked -eq 0 ] && [ "$(el)" -ge "$CHECK_AT" ]; then
    checked=1
    s1=$(last_step "$FIRST"); s1=${s1:-0}
    sleep 20
    s2=$(last_step "$FIRST"); s2=${s2:-0}
    rate=$(python3 -c "print(max(($s2 - $s1) / 20.0, 1e-9))")
    need=$(python3 -c "print(int(($STEPS - $s2) / $rate))")
    say "${#NAMES[@]} runs at once: $FIRST at step $s2, $rate steps/s per run, $need s to finish, $((BUDGET - $(el))) s left"
    if [ "$need" -gt $((BUDGET - $(el))) ]; then
      for n in "${NAMES[@]:2}"; do kill "${PID[$n]}" 2>/dev/null && say "stopped $n to let $FIRST and $SECOND finish"; done
    fi
  fi
  if [ "$(el)" -ge "$BUDGET" ]; then
    say "budget reached: stopping the runs"
    break
  fi
done
for n in "${!PID[@]}"; do
  alive "$n" && kill "${PID[$n]}" 2>/dev/null
  say "$n: last step $(last_step "$n"); $(tail -n 2 "$W/$n.out" | tr '\r' '\n' | tail -n 2 | tr '\n' ' ')"
done
wait 2>/dev/null
for n in "${NAMES[@]}"; do
  (cd "$W" && tar cf "$OUT/$n.tar" --ignore-failed-read "$n".step*.safetensors "$n.log.jsonl" "$n.out" \
    "$n.safetensors" "$n.best.safetensors" 2>/dev/null)
done
say "done; $(ls "$W" | grep -c '\.step[0-9]*\.safetensors$') checkpoint models"
