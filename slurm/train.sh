#!/bin/bash
# Train the teacher or the student alone on Slurm: `accelerate launch -m kdist.train` on every node.
#   sbatch slurm/train.sh teacher [--config configs/lite0.yaml] [kdist train options]
# Submit from the repository root; EDIT the #SBATCH lines as in slurm/distill.sh.
#SBATCH --job-name=kdist-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append          # a requeued run appends to the same log
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
##SBATCH --partition=gpu
##SBATCH --account=my-lab
source "${KDIST_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/job.sh" train "$@"
