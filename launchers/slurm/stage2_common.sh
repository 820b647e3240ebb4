# Shared by the stage2_*.sbatch wrappers (sourced, not run). Owns: finding the repo, the learner
# placement flags from STAGE2_* variables, forwarding SLURM's pre-timeout signal to the launch, and
# the requeue decision. Every process is started and stopped by stage2-launch; this file only signals it.
#
# Variables (all optional):
#   STAGE2_REPO          checkout to run in (default: $SLURM_SUBMIT_DIR, where you ran sbatch)
#   STAGE2_LAUNCH        the launch command (default: stage2-launch from PATH)
#   STAGE2_PYTHON        the project's python, for port derivation and health waits (default: python)
#   STAGE2_CPU=1         CPU mode (no GPUs): --gpus cpu --nproc ${STAGE2_NPROC:-1} (what the tests use)
#   STAGE2_GPUS          learner GPU ids on each node (default: every GPU SLURM gave the job, minus
#                        STAGE2_SERVER_GPUS)
#   STAGE2_SERVER_GPUS   rollout-server GPU ids (single node; server mode)
#   STAGE2_MAX_REQUEUES  give up requeueing after this many restarts (default 20): no requeue loops

set -uo pipefail

stage2_log() { echo "[stage2 sbatch $(date +%H:%M:%S)] $*" >&2; }

stage2_cd_repo() {
    cd "${STAGE2_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" || { stage2_log "cannot cd to the repo"; exit 1; }
    STAGE2_LAUNCH=${STAGE2_LAUNCH:-stage2-launch}
    STAGE2_PYTHON=${STAGE2_PYTHON:-python}
    if ! command -v "${STAGE2_LAUNCH%% *}" >/dev/null 2>&1; then
        stage2_log "'$STAGE2_LAUNCH' is not on PATH: activate the project's venv before sbatch" \
            "(source $PWD/.venv/bin/activate; sbatch exports your environment) or set STAGE2_LAUNCH=$PWD/.venv/bin/stage2-launch"
        exit 1
    fi
    stage2_log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on $(hostname -s), repo $PWD"
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

# A port in [20000, 40000) that every node and rerun of this job derives the same (launchers/topology.py).
stage2_job_port() {
    "$STAGE2_PYTHON" -c "from launchers.topology import job_port; print(job_port('$SLURM_JOB_ID', '$1'))"
}

# Run "$@" in the background, forward USR1/TERM/INT to it, wait until it really exits; sets STAGE2_RC.
# With `#SBATCH --signal=B:USR1@N` SLURM signals only this batch shell; stage2-launch (or srun, which
# forwards to every node's stage2-launch) passes it to the learner, which checkpoints and exits 138.
stage2_run_forwarding() {
    STAGE2_STOP=""
    "$@" &
    STAGE2_CHILD=$!
    trap 'STAGE2_STOP=USR1; stage2_log "USR1: asking the learner to checkpoint"; kill -USR1 $STAGE2_CHILD 2>/dev/null' USR1
    trap 'STAGE2_STOP=TERM; stage2_log "TERM: forwarding"; kill -TERM $STAGE2_CHILD 2>/dev/null' TERM
    trap 'STAGE2_STOP=INT; kill -INT $STAGE2_CHILD 2>/dev/null' INT
    while kill -0 "$STAGE2_CHILD" 2>/dev/null; do wait "$STAGE2_CHILD"; done  # a trapped signal interrupts wait
    wait "$STAGE2_CHILD"
    STAGE2_RC=$?
    trap - USR1 TERM INT
}

# 138 = the learner stopped on SIGUSR1 after writing a checkpoint: requeue; the rerun passes
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
