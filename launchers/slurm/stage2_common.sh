# Shared by the stage2_*.sbatch wrappers (sourced, not run). Owns: finding the repo, the learner
# placement flags from STAGE2_* variables, the CPU request of each srun step, forwarding SLURM's
# pre-timeout signal to the launch, per-task exit codes, and the requeue decision. Every process is
# started and stopped by stage2-launch; this file only signals it. See docs/STAGE2_RUNBOOK.md,
# "Running on a cluster".
#
# Variables (all optional):
#   STAGE2_REPO          checkout to run in (default: $SLURM_SUBMIT_DIR, where you ran sbatch)
#   STAGE2_LAUNCH        the launch command (default: stage2-launch from PATH)
#   STAGE2_PYTHON        the project's python, for port derivation and health waits (default: python)
#   STAGE2_CPU=1         CPU mode (no GPUs): --gpus cpu --nproc ${STAGE2_NPROC:-1} (what the tests use)
#   STAGE2_GPUS          learner GPU ids on each node (default: every GPU SLURM gave the job, minus
#                        STAGE2_SERVER_GPUS)
#   STAGE2_SERVER_GPUS   rollout-server GPU ids (single node; server mode)
#   STAGE2_CPUS_PER_TASK CPUs of each srun task = one node's stage2-launch or server (default: every CPU
#                        SLURM gave the job on the node, $SLURM_CPUS_ON_NODE); srun no longer inherits it
#   STAGE2_SOCKET_IFNAME network interface for NCCL and gloo (exported as NCCL_SOCKET_IFNAME and
#                        GLOO_SOCKET_IFNAME unless those are set; every srun task inherits them)
#   STAGE2_MAX_REQUEUES  give up requeueing after this many restarts (default 20): no requeue loops
#   STAGE2_STATE_DIR     where the learner tasks leave their exit codes (default: .stage2-slurm in the
#                        submit dir; must be on a filesystem every node shares)

set -uo pipefail

stage2_log() { echo "[stage2 sbatch $(date +%H:%M:%S)] $*" >&2; }

# The stop-signal traps are installed as soon as this file is sourced: a USR1 that arrives before the
# launch started (e.g. during the split script's health wait) must not kill the batch shell.
STAGE2_STOP=""
STAGE2_CHILD=""
stage2_on_signal() {
    STAGE2_STOP=$1
    if [ -n "$STAGE2_CHILD" ]; then
        stage2_log "$1: forwarding to the launch (the learners checkpoint and exit)"
        kill -"$1" "$STAGE2_CHILD" 2>/dev/null
    else
        stage2_log "$1 before the learners started: they will not start"
    fi
}
trap 'stage2_on_signal USR1' USR1
trap 'stage2_on_signal TERM' TERM
trap 'stage2_on_signal INT' INT

stage2_cd_repo() {
    cd "${STAGE2_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" || { stage2_log "cannot cd to the repo"; exit 1; }
    STAGE2_LAUNCH=${STAGE2_LAUNCH:-stage2-launch}
    STAGE2_PYTHON=${STAGE2_PYTHON:-python}
    STAGE2_CPT=${STAGE2_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    if [ -n "${STAGE2_SOCKET_IFNAME:-}" ]; then
        export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$STAGE2_SOCKET_IFNAME}
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$STAGE2_SOCKET_IFNAME}
    fi
    if ! command -v "${STAGE2_LAUNCH%% *}" >/dev/null 2>&1; then
        stage2_log "'$STAGE2_LAUNCH' is not on PATH: activate the project's venv before sbatch" \
            "(source $PWD/.venv/bin/activate; sbatch exports your environment) or set STAGE2_LAUNCH=$PWD/.venv/bin/stage2-launch"
        exit 1
    fi
    stage2_log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on $(hostname -s), repo $PWD," \
        "$STAGE2_CPT CPU(s) per task"
}

# Count the GPUs SLURM exposed (CUDA_VISIBLE_DEVICES), as ids 0..n-1 relative to that list.
stage2_visible_ids() {
    local n=0
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then n=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"); fi
    [ "$n" -gt 0 ] && seq -s, 0 $((n - 1))
}

# Learner placement flags for stage2-launch on this node, into the array STAGE2_PLACEMENT.
stage2_placement() {
    if [ "${STAGE2_CPU:-0}" = 1 ]; then
        STAGE2_PLACEMENT=(--gpus cpu --nproc "${STAGE2_NPROC:-1}")
        return
    fi
    local gpus=${STAGE2_GPUS:-}
    if [ -z "$gpus" ]; then
        gpus=$(stage2_visible_ids) || { stage2_log "no GPUs visible (CUDA_VISIBLE_DEVICES empty): request GPUs (sbatch --gpus-per-node=N) or set STAGE2_CPU=1"; exit 1; }
        if [ -n "${STAGE2_SERVER_GPUS:-}" ]; then
            gpus=$(tr , '\n' <<<"$gpus" | grep -vxF -f <(tr , '\n' <<<"$STAGE2_SERVER_GPUS") | paste -sd,)
        fi
    fi
    STAGE2_PLACEMENT=(--gpus "$gpus")
    if [ -n "${STAGE2_SERVER_GPUS:-}" ]; then STAGE2_PLACEMENT+=(--server-gpus "$STAGE2_SERVER_GPUS"); fi
}

# Only the `--set K=V` pairs of "$@" (what `stage2 serve` shares with stage2-launch), into STAGE2_SETS.
stage2_set_args() {
    STAGE2_SETS=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --set) [ $# -ge 2 ] && STAGE2_SETS+=(--set "$2"); shift 2 ;;
            --set=*) STAGE2_SETS+=("$1"); shift ;;
            *) shift ;;
        esac
    done
}

# A port below the ephemeral range that every node and rerun of this job derives the same
# (launchers/ports.py job_port); computed once here and handed to every node.
stage2_job_port() {
    "$STAGE2_PYTHON" -c "from launchers.ports import job_port; print(job_port('$SLURM_JOB_ID', '$1'))"
}

# Where the learner tasks write their exit codes (one file per task): the submit dir is on the shared
# filesystem the checkpoints need anyway. Missing files fall back to srun's code.
stage2_rc_dir() {
    STAGE2_RC_DIR=${STAGE2_STATE_DIR:-$PWD/.stage2-slurm}/job-${SLURM_JOB_ID:-0}-restart-${SLURM_RESTART_COUNT:-0}
    rm -rf "$STAGE2_RC_DIR" && mkdir -p "$STAGE2_RC_DIR"
}

# One learner task (run by srun as `bash -c "$STAGE2_TASK" LAUNCH ARGS...`): starts stage2-launch with
# this node's rank, records and prints its exit code, exits with it (138 → 0: --kill-on-bad-exit
# would otherwise TERM the nodes still finishing their part of the checkpoint). The node rank comes from
# $SLURM_NODEID on EACH node (the single quotes keep it unexpanded here). Signals: slurmstepd delivers
# what srun forwards (USR1, TERM) to every process of the task, stage2-launch included, so this shell
# only ignores them (set after the fork: the launch keeps the default handlers); a trap here would
# interrupt `wait` and lose the launch's exit code.
# shellcheck disable=SC2016
STAGE2_TASK='
    $0 --nnodes "$SLURM_STEP_NUM_NODES" --node-rank "$SLURM_NODEID" "$@" &
    child=$!
    trap "" USR1 TERM INT
    wait $child; rc=$?
    echo "$rc" > "$STAGE2_RC_DIR/task-$SLURM_PROCID" 2>/dev/null
    echo "[stage2 task] task $SLURM_PROCID (node rank $SLURM_NODEID, $SLURMD_NODENAME) exit $rc" >&2
    [ "$rc" = 138 ] && exit 0  # checkpointed: not a failure that should make srun kill the other nodes
    exit $rc'

# Run "$@" in the background, forward USR1/TERM/INT to it (the traps above), wait until it really
# exits; sets STAGE2_RC. With `#SBATCH --signal=B:USR1@N` SLURM signals only this batch shell;
# stage2-launch (or srun, which forwards to every task) passes it to the learner, which checkpoints
# and exits 138.
stage2_run_forwarding() {
    if [ -n "$STAGE2_STOP" ]; then
        stage2_log "not starting the learners: $STAGE2_STOP arrived before them"
        STAGE2_RC=1
        return
    fi
    "$@" &
    STAGE2_CHILD=$!
    while kill -0 "$STAGE2_CHILD" 2>/dev/null; do wait "$STAGE2_CHILD"; done  # a trapped signal interrupts wait
    wait "$STAGE2_CHILD"
    STAGE2_RC=$?
    STAGE2_CHILD=""
}

# The job's code from the tasks' codes ($STAGE2_RC_DIR/task-*, $1 = tasks expected; srun's own code
# is the highest, which says little once --kill-on-bad-exit has TERMed the others, and a task that
# checkpointed reports 0 to srun):
#   every task 138 (each node saw a complete checkpoint after USR1) → 138 (stage2_finish requeues);
#   every task 0 → 0; a task that failed by itself (1..127) → its code, naming the task;
#   stopped (a signal reached the learners) but not every task checkpointed → 1;
#   otherwise the highest code (e.g. 143 when the job was cancelled).
stage2_task_codes() {
    local expected=$1 codes=() f rc first_fail=""
    for ((i = 0; i < expected; i++)); do
        f=$STAGE2_RC_DIR/task-$i
        if [ ! -s "$f" ]; then
            stage2_log "task $i left no exit code in $STAGE2_RC_DIR (not on a filesystem all nodes share?):" \
                "using srun's code $STAGE2_RC${STAGE2_STOP:+, or 1 after $STAGE2_STOP (no requeue)}"
            if [ -n "$STAGE2_STOP" ] && [ "$STAGE2_RC" = 0 ]; then STAGE2_RC=1; fi
            return
        fi
        rc=$(cat "$f")
        codes+=("$rc")
        if [ -z "$first_fail" ] && [ "$rc" -ge 1 ] && [ "$rc" -le 127 ]; then first_fail=$i; fi
    done
    stage2_log "task exit codes: ${codes[*]} (srun: $STAGE2_RC)"
    if [ "$(printf '%s\n' "${codes[@]}" | sort -u)" = 138 ]; then
        STAGE2_RC=138
    elif [ "$(printf '%s\n' "${codes[@]}" | sort -u)" = 0 ]; then
        STAGE2_RC=0
    elif [ -n "$first_fail" ]; then
        STAGE2_RC=${codes[$first_fail]}
        stage2_log "task $first_fail failed with code $STAGE2_RC (see its lines, labelled '$first_fail:');" \
            "the other tasks were stopped because of it"
    elif [ -n "$STAGE2_STOP" ] || printf '%s\n' "${codes[@]}" | grep -qx 138; then
        STAGE2_RC=1
        stage2_log "stopped, but not every node wrote a complete checkpoint: exit 1, no requeue"
    else
        STAGE2_RC=$(printf '%s\n' "${codes[@]}" | sort -n | tail -n 1)
    fi
}

# 138 = every learner stopped on SIGUSR1 after a complete checkpoint: requeue; the rerun passes
# --resume auto and continues from it. Anything else ends the job with that code.
stage2_finish() {
    local restarts=${SLURM_RESTART_COUNT:-0} max=${STAGE2_MAX_REQUEUES:-20}
    if [ "$STAGE2_RC" = 138 ]; then
        if [ "$restarts" -ge "$max" ]; then
            stage2_log "checkpointed on USR1 but already restarted $restarts times (STAGE2_MAX_REQUEUES=$max): not requeueing"
            exit "$STAGE2_RC"
        fi
        stage2_log "checkpointed on USR1 (exit 138): scontrol requeue $SLURM_JOB_ID (restart $((restarts + 1)))"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0  # SLURM ends this run now and starts the job again
        fi
        stage2_log "scontrol requeue failed (was the job submitted with --requeue?)"
    fi
    stage2_log "done: exit $STAGE2_RC${STAGE2_STOP:+ (after $STAGE2_STOP)}"
    exit "$STAGE2_RC"
}
