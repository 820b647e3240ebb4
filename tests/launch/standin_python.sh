#!/bin/bash
# STAND-IN for STAGE2_PYTHON in the real-SLURM tests of the split script only: `-m toolkit.rollout.server`
# becomes the stand-in server (standin_server.py, healthy in well under a second, no vLLM start);
# anything else (port derivation, the health wait) runs the real python.
if [ "${1:-} ${2:-}" = "-m toolkit.rollout.server" ]; then
    shift 2
    exec "$STANDIN_REAL_PYTHON" "$(dirname "$0")/standin_server.py" "$@"
fi
exec "$STANDIN_REAL_PYTHON" "$@"
