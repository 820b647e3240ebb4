"""Run one launch through the real planner and supervisor, with the rollout server swapped for the
stand-in (tests/launch/standin_server.py) for the faults a real server cannot be made to show, or
kept real with `"standin_mode": "real"`. Everything else — the learner command (torchrun +
toolkit.train), envs, logs, signals, cleanup — is the real thing.

    python tests/launch/_drive.py '{"profile": "smoke/a_only", "sets": [...], "flags": {"gpus": "cpu"},
                                    "standin_mode": "never_healthy", "health_timeout": 3}'
Prints the summary line to stderr and exits with the supervisor's exit code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from launchers import launch_cmd
from launchers.supervisor import Supervisor
from toolkit.config.placement import Placement

STANDIN = str(Path(__file__).with_name("standin_server.py"))


def main() -> int:
    spec = json.loads(sys.argv[1])
    req = launch_cmd.LaunchRequest(
        spec["profile"],
        tuple(spec.get("sets", ())),
        Placement.from_flags(**spec.get("flags", {})),
        health_timeout=spec.get("health_timeout", 30.0),
        stop_timeout=spec.get("stop_timeout", 120.0),
    )
    launch_cmd._setup_logging()
    lp = launch_cmd.plan_launch(req, dict(os.environ))
    for server in lp.plan.servers if spec.get("standin_mode") != "real" else ():
        argv = server.process.argv
        assert argv[1:3] == ["-m", "toolkit.rollout.server"], argv
        server.process.argv = [argv[0], STANDIN, *argv[3:]]
        server.process.env = {
            **server.process.env,
            "STANDIN_MODE": spec.get("standin_mode", "ok"),
            "STANDIN_MODEL": lp.contract["server_model"],
        }
    outcome = Supervisor(grace=spec.get("grace", 5.0), stop_timeout=req.stop_timeout).run(lp.plan)
    print(launch_cmd.summary_line(lp, outcome.exit_code, outcome.wall_s, outcome.reason), file=sys.stderr)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
