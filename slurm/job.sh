# Shared body of slurm/train.sh and slurm/distill.sh (sourced, not submitted): one srun task per node, each
# running `accelerate launch -m kdist.<command>` for its node; preemption and time limits end in a saved
# state and a requeue, and the requeued job resumes by itself.
#
# Settings come from the environment (sbatch passes it on), with cluster defaults:
#   KDIST_LAUNCH_CONFIG  accelerate config file                       (default launch/8gpu.yaml)
#   KDIST_PROCS_PER_NODE processes per node = GPUs per node           (default: the GPUs Slurm gave the node, else 1)
#   KDIST_OUT            run folder, on a filesystem every node sees  (default runs/slurm-<job name>-<job id>)
#   KDIST_PORT           the main process's port                      (default 29500 + job id % 1000)
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

LAUNCH_CONFIG=${KDIST_LAUNCH_CONFIG:-launch/8gpu.yaml}
PROCS_PER_NODE=${KDIST_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
OUT=${KDIST_OUT:-runs/slurm-${SLURM_JOB_NAME:-kdist}-${SLURM_JOB_ID}}
PORT=${KDIST_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
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
ROLE=() TEACHERS=() KEEP=() previous=""
for arg in "$@"; do
    if [ "$previous" = --teacher ]; then
        [ -f "$arg" ] || fail "teacher weights $arg not found; train the teacher first (slurm/train.sh teacher) or fix --teacher"
        TEACHERS+=(--teacher "$arg")
    fi
    case "$arg" in teacher|student) [ "$COMMAND" = train ] && [ ${#ROLE[@]} = 0 ] && ROLE=("$arg") ;; --no-progress|--val-only) KEEP+=("$arg") ;; esac
    previous=$arg
done
[ "$COMMAND" = distill ] && [ ${#TEACHERS[@]} = 0 ] && fail "distill needs --teacher T.safetensors"
OWNER_FILE="$OUT/.slurm-owner-$COMMAND${ROLE[0]:+-${ROLE[0]}}"
if [ -f "$OWNER_FILE" ] && [ "$(cat "$OWNER_FILE")" != "$SLURM_JOB_ID" ]; then
    fail "$OUT holds the $COMMAND ${ROLE[0]:-} of job $(cat "$OWNER_FILE"); set KDIST_OUT to another folder"
fi
mkdir -p "$OUT"
echo "$SLURM_JOB_ID" > "$OWNER_FILE"

# A requeued job finds its run folder (named from the job) and resumes it with the saved config.
if [ -f "$OUT/config.yaml" ] && [ -d "$OUT/${ROLE[0]:-distilled}/checkpoints" ]; then
    ARGS=("${ROLE[@]}" "${TEACHERS[@]}" "${KEEP[@]}" --resume "$OUT")
    echo "kdist-slurm: resuming $OUT (restart ${SLURM_RESTART_COUNT:-0})"
else
    ARGS=("$@" --out "$OUT")
fi

# --- preemption: Slurm signals the batch shell (--signal=B:USR1@T, scancel --signal=USR1 --batch) ------
# A signal to the launcher would not reach the training processes, so the trap leaves a file that kdist
# checks after every step: all processes finish the step, save their state and exit; the job is requeued.
export KDIST_STOP_FILE="$OUT/.stop-requested"
rm -f "$KDIST_STOP_FILE"
trap 'echo "kdist-slurm: stop signal: saving and requeueing"; touch "$KDIST_STOP_FILE"' USR1 TERM

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

if [ -f "$KDIST_STOP_FILE" ] && [ "$STATUS" != 0 ]; then
    echo "kdist-slurm: state saved in $OUT; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$STATUS"
