"""`python -m toolkit.torchrun …`: torch's torchrun (`torch.distributed.run`, same flags), minus the traceback
on a clean stop.

When stage2-launch forwards SIGTERM/SIGUSR1, torchrun hands the signal to the ranks, waits for them to finish
their step and checkpoint (TORCH_ELASTIC_SHUTDOWN_TIMEOUT), and then lets a `SignalException` escape as a
traceback, although nothing went wrong. Here that ends in one line and exit 128+N instead; whether the ranks
checkpointed is read from the run folder by the launcher (docs/STAGE2_RUNBOOK.md §7). Any other failure keeps
torchrun's own report. This runs in the learner's process, never in the launcher's (which imports no torch).
"""

from __future__ import annotations

import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main()
    except SignalException as exc:
        signum = int(exc.sigval)
        print(
            f"torchrun: stopped by signal {signum} ({exc.sigval.name}) after the ranks finished; exit {128 + signum}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
