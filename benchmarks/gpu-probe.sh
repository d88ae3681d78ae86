#!/usr/bin/env bash
# Issue 41, stage (a), as one prepared command for a single GPU (a GPU image with torch, torchvision,
# accelerate and safetensors, but no internet): the two Lite0 teachers, the consistent-teaching probe
# (configs/experiments/probe-consistent-mixup.yaml: the pair online on mixed batches, 300 epochs) and the equally trained
# student alone (configs/experiments/probe-consistent-mixup-alone.yaml), seed 0, val only, exactly the CPU commands.
#   make gpu-kit                     # on a machine with pip: .gpu/whl (what the image lacks) and .gpu/data
#   bash benchmarks/gpu-probe.sh         # on the GPU machine, .gpu beside it; figures and logs into $OUT
#   KDIST_PROBE_SMOKE=1 bash benchmarks/gpu-probe.sh    # every step for 1 epoch on a subset: checks the script
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .gpu/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kdist-site .gpu/whl/*.whl
  export PYTHONPATH="$PWD:/tmp/kdist-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export KDIST_DATA_ROOT="${KDIST_DATA_ROOT:-$PWD/.gpu/data}" PYTHONUNBUFFERED=1
runs="${KDIST_PROBE_RUNS:-runs/gpu-probe}"
out="${OUT:-$runs}"
mkdir -p "$runs" "$out"
smoke=()
if [ "${KDIST_PROBE_SMOKE:-0}" = 1 ]; then
  smoke=(--set data.train_subset=512 --set data.val_subset=256 --set teacher.epochs=1 --set student.epochs=1 --set distill.epochs=1)
fi
common=(--seed 0 --val-only --shards none "${smoke[@]}")

step() {  # step NAME COMMAND...: run it, log its wall time, keep its results.json
  local name=$1 start; shift
  start=$(date +%s)
  echo "== $name: $*" | tee -a "$out/log.txt"
  "$@" 2>&1 | tee -a "$out/log.txt"
  echo "== $name took $(( $(date +%s) - start )) s" | tee -a "$out/log.txt"
}
python3 -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$out/log.txt"
step teacher64 python3 -m kdist.cli train teacher --config configs/lite0.yaml "${common[@]}" --out "$runs/lite0-28"
step teacher128 python3 -m kdist.cli train teacher --config configs/lite0.yaml "${common[@]}" \
  --set teacher_model.input_size=128 --out "$runs/lite0-28-in128"
step probe python3 -m kdist.cli distill --config configs/experiments/probe-consistent-mixup.yaml "${common[@]}" --out "$runs/probe-mixup" \
  --teacher "$runs/lite0-28/teacher.safetensors" --teacher "$runs/lite0-28-in128/teacher.safetensors"
step alone python3 -m kdist.cli train student --config configs/experiments/probe-consistent-mixup-alone.yaml "${common[@]}" --out "$runs/probe-mixup-alone"
for name in lite0-28 lite0-28-in128 probe-mixup probe-mixup-alone; do
  cp "$runs/$name/results.json" "$out/$name.json"
done
cp "$runs/probe-mixup/distilled/metrics.csv" "$out/probe-mixup-metrics.csv"
cp "$runs/probe-mixup-alone/student/metrics.csv" "$out/probe-mixup-alone-metrics.csv"
