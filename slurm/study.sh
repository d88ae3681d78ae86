#!/bin/bash
# The whole study on Slurm as a chain of jobs: the teacher; then the student alone and the distilled student
# (both after the teacher, side by side); then the report. All write into one run folder and log to one W&B
# group (the study's name; KDIST_GROUP overrides). Each job has its own stop file: a signal to one job stops
# that job only.
#   bash slurm/study.sh [--config configs/default.yaml] [options for every stage]      (run it, don't sbatch it)
# Extra sbatch options for every job, the report's included (e.g. --partition=gpu --account=my-lab, or a test
# cluster without GPUs), go in KDIST_SBATCH; the #SBATCH --partition/--account lines of slurm/train.sh reach
# the report job too.
set -euo pipefail
cd "${KDIST_HOME:-.}"
STUDY=${KDIST_OUT:-runs/study-$(date +%Y%m%d-%H%M%S)}
GROUP=${KDIST_GROUP:-$(basename "$STUDY")}
read -r -a EXTRA <<< "${KDIST_SBATCH:-}"
# sbatch reads a script's #SBATCH lines itself; the report job is a --wrap, so pass them on by hand.
read -r -a SITE <<< "$(sed -n 's/^#SBATCH \(--\(partition\|account\)=[^ ]*\).*/\1/p' slurm/train.sh | tr '\n' ' ')"
submit() { sbatch --parsable "${EXTRA[@]}" "$@"; }
export KDIST_OUT=$STUDY
GROUPING=(--set "trainer.wandb_group=$GROUP")
teacher=$(submit --job-name=kdist-teacher slurm/train.sh teacher "$@" "${GROUPING[@]}")
student=$(submit --job-name=kdist-student --dependency=afterok:"$teacher" slurm/train.sh student "$@" "${GROUPING[@]}")
distilled=$(submit --job-name=kdist-distill --dependency=afterok:"$teacher" slurm/distill.sh --teacher "$STUDY/teacher.safetensors" "$@" \
    "${GROUPING[@]}")
report=$(sbatch --parsable --output="slurm-%x-%j.out" "${SITE[@]}" "${EXTRA[@]}" --job-name=kdist-report \
    --dependency=afterok:"$student:$distilled" --ntasks=1 --wrap "${KDIST_VENV:-.venv}/bin/kdist report $STUDY")
echo "study $STUDY (W&B group $GROUP): teacher $teacher, student $student, distilled $distilled, report $report"
