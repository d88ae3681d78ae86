#!/usr/bin/env bash
# What only a GPU can show, as one prepared command for a single GPU (under 8 minutes): one PASS/FAIL line per
# check, figures and logs into $OUT (default runs/gpu-smoke). Needs the data root ($KDIST_DATA_ROOT, else .gpu/data).
#   bash benchmarks/gpu-smoke.sh                      # on the GPU machine
#   KDIST_SMOKE_CPU=1 bash benchmarks/gpu-smoke.sh    # the same checks, reduced, on CPUs (part of `make test`)
# Exit code: the number of failed checks (0: all passed).
set -uo pipefail
cd "$(dirname "$0")/.."
export KDIST_DATA_ROOT="${KDIST_DATA_ROOT:-$PWD/.gpu/data}" PYTHONUNBUFFERED=1
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
out="${OUT:-runs/gpu-smoke}"
runs="$out/runs"
rm -rf "$runs"
mkdir -p "$runs"
if [ "${KDIST_SMOKE_CPU:-0}" = 1 ]; then
  launch_config=launch/cpu.yaml
  small=(--set data.train_subset=256 --set data.val_subset=128 --set teacher.epochs=1 --set student.epochs=1
         --set distill.epochs=2 --set distill.batch_size=32)
  bench=(--steps 2 --no-processes --shards none --set data.train_subset=512)
else
  launch_config=launch/1gpu.yaml
  small=()
  bench=(--steps 30)
fi
common=(--quick --no-progress --shards none "${small[@]}")
failed=0
check() {  # check NAME CONDITION-COMMAND...: PASS or FAIL, one line
  local name=$1; shift
  if "$@" >>"$out/log.txt" 2>&1; then echo "PASS $name"; else echo "FAIL $name"; failed=$((failed + 1)); fi
}
kdist() { "$PY" -m kdist.cli "$@" >>"$out/log.txt" 2>&1; }
acc() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['models'][sys.argv[2]]['val']['acc'])" "$@"; }
close() { "$PY" -c "import sys; a, b, tol = map(float, sys.argv[1:]); sys.exit(abs(a - b) > tol)" "$@"; }

: >"$out/log.txt"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
  '| torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee "$out/device.txt"

# 1. The README's quick run: teacher, student, distilled, report.
check "quick run (kdist run --quick)" kdist run "${common[@]}" --out "$runs/quick"
teacher="$runs/quick/teacher.safetensors"

# 2. Online vs cached teacher: the same targets, so the same study up to float rounding.
kdist distill --teacher "$teacher" "${common[@]}" --val-only --teacher-mode online --out "$runs/online"
kdist distill --teacher "$teacher" "${common[@]}" --val-only --teacher-mode cached --out "$runs/cached"
check "online and cached distillation agree (val acc within 0.03)" \
  close "$(acc "$runs/online/results.json" distilled)" "$(acc "$runs/cached/results.json" distilled)" 0.03

# 3. fp16 vs float32 Hinton: the epoch-0 training loss within 5% (the teacher runs in bf16 or float32 under both).
for precision in fp16 no; do
  kdist distill --teacher "$teacher" "${common[@]}" --val-only --teacher-mode online --set kd.method=hinton \
    --mixed-precision "$precision" --out "$runs/hinton-$precision"
done
loss0() { "$PY" -c "import csv,sys; print(next(csv.DictReader(open(sys.argv[1])))['train/loss'])" "$1/distilled/metrics.csv"; }
check "fp16 and float32 Hinton loss at epoch 0 within 5%" \
  "$PY" -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); sys.exit(abs(a - b) > 0.05 * abs(b))" \
  "$(loss0 "$runs/hinton-fp16")" "$(loss0 "$runs/hinton-no")"

# 4. The compiled teacher (inductor): trains, and gives the eager teacher's study.
kdist distill --teacher "$teacher" "${common[@]}" --val-only --teacher-mode online --set kd.compile_teacher=true \
  --out "$runs/compiled"
check "compiled teacher (val acc within 0.03 of eager)" \
  close "$(acc "$runs/compiled/results.json" distilled)" "$(acc "$runs/online/results.json" distilled)" 0.03

# 5. A stop request mid-epoch (the file Slurm's batch script touches), then --resume.
stop="$runs/stop"
KDIST_STOP_FILE="$stop" "$PY" -m kdist.cli distill --teacher "$teacher" "${common[@]}" --val-only \
  --teacher-mode online --out "$runs/stopped" >>"$out/log.txt" 2>&1 &
pid=$!
for _ in $(seq 1 3000); do
  [ -f "$runs/stopped/distilled/checkpoints/last/progress.json" ] && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.1
done
touch "$stop"
wait $pid
code=$?
rm -f "$stop"
check "stop request exits 75 after saving mid-epoch" \
  "$PY" -c "import json,sys; p=json.load(open(sys.argv[1])); sys.exit(not (int(sys.argv[2]) == 75 and p['step_in_epoch'] > 0))" \
  "$runs/stopped/distilled/checkpoints/last/progress.json" "$code"
kdist distill --teacher "$teacher" --resume "$runs/stopped" --val-only --no-progress
check "resumed run ends as the uninterrupted one (val acc within 0.03)" \
  close "$(acc "$runs/stopped/results.json" distilled)" "$(acc "$runs/online/results.json" distilled)" 0.03

# 6. Evaluation is float32 whatever the launch's precision.
for precision in bf16 no; do
  "$PY" -m accelerate.commands.launch --config_file "$launch_config" --num_processes 1 --mixed_precision "$precision" \
    -m kdist.evaluate "$runs/quick/distilled.safetensors" --shards none --split val >"$runs/eval-$precision.json" 2>>"$out/log.txt"
done
check "float32 evaluation equal under bf16 and no launch precision" \
  "$PY" -c "import json,sys; a, b = (json.load(open(f))['val'] for f in sys.argv[1:]); sys.exit(a != b)" \
  "$runs/eval-bf16.json" "$runs/eval-no.json"

# 7. kdist bench on this device.
check "kdist bench" kdist bench --quick "${bench[@]}" --out "$runs/bench"

cp "$runs"/*/results.json "$out/" 2>/dev/null
for run in quick online cached hinton-fp16 hinton-no compiled stopped; do
  [ -f "$runs/$run/results.json" ] && cp "$runs/$run/results.json" "$out/$run.json"
done
[ -f "$runs/bench/bench.json" ] && cp "$runs/bench/bench.json" "$out/bench.json"
echo "$failed check(s) failed; figures and logs in $out"
exit "$failed"
