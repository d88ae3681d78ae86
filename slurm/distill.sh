#!/bin/bash
# Distil the student from a trained teacher on Slurm: `accelerate launch -m kdist.distill` on every node.
#   sbatch slurm/distill.sh --teacher runs/t/teacher.safetensors [--config configs/ensemble-lite0.yaml] [kdist distill options]
# Submit from the repository root. EDIT the #SBATCH lines for your cluster; settings such as the launch
# config and the run folder are environment variables, listed in slurm/job.sh.
#SBATCH --job-name=kdist-distill
#SBATCH --nodes=1                    # machines; 4 nodes x 8 GPUs: --nodes=4
#SBATCH --ntasks-per-node=1          # one launcher per node: it starts one process per GPU
#SBATCH --gres=gpu:8                 # GPUs per node (EDIT; KDIST_PROCS_PER_NODE follows it)
#SBATCH --cpus-per-task=32           # data loading and the launcher (EDIT)
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append          # a requeued run appends to the same log
#SBATCH --requeue                    # a preempted or timed-out job comes back and resumes
#SBATCH --signal=B:USR1@180          # 180 s before the time limit: save and requeue
##SBATCH --partition=gpu             # EDIT: your partition
##SBATCH --account=my-lab            # EDIT: your account
source "${KDIST_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/job.sh" distill "$@"
