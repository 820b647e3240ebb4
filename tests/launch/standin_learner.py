"""A STAND-IN for `stage2-launch`, for the real-SLURM tests of the sbatch wrappers only.

What these tests check is SLURM's side: which node runs which srun task with how many CPUs, what the
per-task exit codes make of the job's code, and when the job requeues. A real learner would add
minutes per job without changing any of that (test_slurm.py and the multinode run in
test_slurm_multinode.py use the real one). It records where it ran (JSON in $STANDIN_RECORD), then
acts out $STANDIN_PLAN, a comma list of `[RESTART.]NODE_RANK=ACTION`:
    exit:N      exit with code N at once
    wait:N      wait for a signal: USR1 → exit N (N=138: "checkpointed"), TERM/INT → exit 143
Stdlib only.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> None:
    argv = sys.argv[1:]
    rank = argv[argv.index("--node-rank") + 1] if "--node-rank" in argv else "0"
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    plan = dict(item.split("=", 1) for item in os.environ.get("STANDIN_PLAN", "").split(",") if item)
    action = plan.get(f"{restart}.{rank}", plan.get(rank, "exit:0"))
    status = Path("/proc/self/status").read_text()
    cpus = next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
    record = {
        "node_rank": rank,
        "node": os.environ.get("SLURMD_NODENAME"),
        "cpus_allowed": cpus,
        "cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK"),
        "step_tasks": os.environ.get("SLURM_STEP_NUM_TASKS"),
        "restart": restart,
        "argv": argv,
        "action": action,
    }
    Path(os.environ["STANDIN_RECORD"], f"r{restart}-n{rank}.json").write_text(json.dumps(record))
    print(f"standin learner node rank {rank} on {record['node']}: {action}", flush=True)
    kind, code = action.split(":")
    if kind == "exit":
        sys.exit(int(code))
    signal.signal(signal.SIGUSR1, lambda *_: sys.exit(int(code)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(143))
    Path(os.environ["STANDIN_RECORD"], f"r{restart}-n{rank}.ready").touch()
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
