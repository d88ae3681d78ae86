#!/bin/bash
# The whole study on Slurm as a chain of jobs: the teacher; then the student alone and the distilled student
# (both after the teacher, side by side); then the report. All write into one run folder.
#   bash slurm/study.sh [--config configs/default.yaml] [options for every stage]      (run it, don't sbatch it)
# Extra sbatch options for every job (e.g. a test cluster without GPUs) go in KDIST_SBATCH.
set -euo pipefail
cd "${KDIST_HOME:-.}"
STUDY=${KDIST_OUT:-runs/study-$(date +%Y%m%d-%H%M%S)}
read -r -a EXTRA <<< "${KDIST_SBATCH:-}"
submit() { sbatch --parsable "${EXTRA[@]}" "$@"; }
export KDIST_OUT=$STUDY
teacher=$(submit --job-name=kdist-teacher slurm/train.sh teacher "$@")
student=$(submit --job-name=kdist-student --dependency=afterok:"$teacher" slurm/train.sh student "$@")
distilled=$(submit --job-name=kdist-distill --dependency=afterok:"$teacher" slurm/distill.sh --teacher "$STUDY/teacher.safetensors" "$@")
report=$(sbatch --parsable --output="slurm-%x-%j.out" "${EXTRA[@]}" --job-name=kdist-report --dependency=afterok:"$student:$distilled" \
    --ntasks=1 --wrap "${KDIST_VENV:-.venv}/bin/kdist report $STUDY")
echo "study $STUDY: teacher $teacher, student $student, distilled $distilled, report $report"
