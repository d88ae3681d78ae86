# Shared body of slurm/train.sh and slurm/distill.sh (sourced, not submitted): one srun task per node, each
# running `accelerate launch -m kdist.<command>` for its node; preemption and time limits end in a saved
# state and a requeue, and the requeued job resumes by itself.
#
# Settings come from the environment (sbatch passes it on), with cluster defaults:
#   KDIST_LAUNCH_CONFIG  accelerate config file                       (default launch/8gpu.yaml)
#   KDIST_PROCS_PER_NODE processes per node = GPUs per node           (default: the GPUs Slurm gave the node, else 1)
#   KDIST_OUT            run folder, on a filesystem every node sees  (default runs/slurm-<job name>-<job id>)
#   KDIST_PORT           the main process's port                      (default: a free port on the main node)
#   KDIST_VENV           virtual environment to activate              (default .venv)
set -euo pipefail

fail() { echo "kdist-slurm: error: $*" >&2; exit 2; }

COMMAND=$1; shift  # train | distill
cd "${KDIST_HOME:-${SLURM_SUBMIT_DIR:-.}}"  # sbatch runs a copy of the script: work from where it was submitted

# --- environment: EDIT for your cluster (modules, conda, ...) -----------------------------------------
# module load cuda/12.4
# shellcheck disable=SC1091
source "${KDIST_VENV:-.venv}/bin/activate"
# -------------------------------------------------------------------------------------------------------

# srun does not inherit --cpus-per-task since Slurm 22.05: without this each task (and its 8 GPU processes
# and their DataLoader workers) would get one CPU.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}

LAUNCH_CONFIG=${KDIST_LAUNCH_CONFIG:-launch/8gpu.yaml}
PROCS_PER_NODE=${KDIST_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
OUT=${KDIST_OUT:-runs/slurm-${SLURM_JOB_NAME:-kdist}-${SLURM_JOB_ID}}
# The batch script runs on the job's first node, the main one: ask its kernel for a free port (two jobs on one
# node never collide, as fixed ports derived from job ids did).
PORT=${KDIST_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
TASKS=${SLURM_NTASKS:-1}
NODES=${SLURM_NNODES:-1}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# --- bad settings fail here, at once, not after a collective timeout ------------------------------------
[ -f "$LAUNCH_CONFIG" ] || fail "launch config $LAUNCH_CONFIG not found; set KDIST_LAUNCH_CONFIG to a file in launch/"
if [ "$TASKS" != "$NODES" ] && [ "${KDIST_TASKS_PER_NODE_OK:-0}" != 1 ]; then
    fail "the job has $TASKS tasks on $NODES nodes; kdist needs one task per node (#SBATCH --ntasks-per-node=1): each task's accelerate launch starts that node's $PROCS_PER_NODE processes"
fi
CONFIG_MACHINES=$(sed -n 's/^num_machines: *//p' "$LAUNCH_CONFIG" | head -n 1)
if [ -n "$CONFIG_MACHINES" ] && [ "$CONFIG_MACHINES" != 1 ] && [ "$CONFIG_MACHINES" != "$TASKS" ]; then
    fail "$LAUNCH_CONFIG is for $CONFIG_MACHINES machines but the job has $TASKS nodes; submit with --nodes=$CONFIG_MACHINES or use a config for $TASKS"
fi
# kdist's own options pass through untouched (--teacher X and --teacher=X alike); kdist checks them, before
# it creates or changes the run folder. `--resume auto` continues $OUT when it holds this run (a requeued job).
ROLE=""
[ "$COMMAND" = train ] && ROLE=${1:-}
OWNER_FILE="$OUT/.slurm-owner-$COMMAND${ROLE:+-$ROLE}"
if [ -f "$OWNER_FILE" ] && [ "$(cat "$OWNER_FILE")" != "$SLURM_JOB_ID" ]; then
    fail "$OUT holds the $COMMAND ${ROLE} of job $(cat "$OWNER_FILE"); set KDIST_OUT to another folder"
fi
mkdir -p "$OUT"
echo "$SLURM_JOB_ID" > "$OWNER_FILE"
ARGS=("$@" --out "$OUT" --resume auto)
[ "${SLURM_RESTART_COUNT:-0}" != 0 ] && echo "kdist-slurm: restart ${SLURM_RESTART_COUNT} of job $SLURM_JOB_ID: resuming $OUT"

# --- stopping: what each signal means on a cluster --------------------------------------------------------
# USR1 (--signal=B:USR1@T before the time limit, or scancel --signal=USR1 --batch): the processes save mid-epoch
# and this script requeues the job, which resumes. TERM (preemption, scancel, scontrol requeue): Slurm sends it
# to every process, kdist saves mid-epoch within seconds and exits; the job is not requeued from here (Slurm
# requeues a preempted job itself; a cancelled job stays cancelled). The launcher does not pass USR1 on, so the
# trap leaves a stop file that kdist checks after every step. It is this job's own (a study's jobs share $OUT)
# and lies on this, the main, node: its processes see it, and kdist's processes agree on stopping (all-reduce).
# One file per start of the job: the previous start's batch shell, ending after a requeue, may still touch its own.
export KDIST_STOP_FILE="${TMPDIR:-/tmp}/kdist-stop-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}"
rm -f "$KDIST_STOP_FILE"
REQUEUE=0
trap 'echo "kdist-slurm: USR1: saving, then requeueing"; REQUEUE=1; touch "$KDIST_STOP_FILE"' USR1
trap 'echo "kdist-slurm: TERM: saving and stopping (no requeue from here)"; touch "$KDIST_STOP_FILE"' TERM

echo "kdist-slurm: $COMMAND on $TASKS node(s) x $PROCS_PER_NODE process(es), main $MAIN_HOST:$PORT, run folder $OUT"
# One task per node; each expands its own rank ($SLURM_PROCID) on its node.
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch --config_file "$1" --num_machines "$2" --machine_rank "$SLURM_PROCID" \
    --num_processes "$(($2 * $3))" --main_process_ip "$4" --main_process_port "$5" -m "kdist.$6" "${@:7}"' \
    kdist "$LAUNCH_CONFIG" "$TASKS" "$PROCS_PER_NODE" "$MAIN_HOST" "$PORT" "$COMMAND" "${ARGS[@]}" &
SRUN_PID=$!
while :; do  # a trapped signal interrupts `wait`; wait again until srun itself ends
    STATUS=0
    wait "$SRUN_PID" || STATUS=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done

rm -f "$KDIST_STOP_FILE"
if [ "$REQUEUE" = 1 ] && [ "$STATUS" != 0 ]; then
    echo "kdist-slurm: state saved in $OUT; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$STATUS"
