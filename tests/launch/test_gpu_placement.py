"""On a CUDA machine: the exact torchrun command and env stage2-launch builds for `--gpus 0,…` put
one rank on each listed GPU. The per-rank entry point is swapped for a probe that reports what the
rank sees (the command line and environment up to it are the real ones). Skipped without CUDA."""

from __future__ import annotations

import json

import pytest
from _shared import child_env

pytestmark = pytest.mark.gpu

PROBE = """
import json, os, sys, torch
rank = int(os.environ["RANK"])
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
info = {"rank": rank, "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "count": torch.cuda.device_count(),
        "uuid": str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid),
        "world": os.environ["WORLD_SIZE"]}
open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w").write(json.dumps(info))
"""


def cuda_count() -> int:
    import glob
    import shutil

    if not glob.glob("/dev/nvidia[0-9]*") and shutil.which("nvidia-smi") is None:
        return 0  # no driver: answer without importing torch (seconds on these machines)
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(cuda_count() == 0, reason="needs a CUDA device")
def test_torchrun_ranks_see_exactly_the_listed_gpus(tmp_path):
    from launchers import launch_cmd
    from launchers.supervisor import Supervisor
    from toolkit.config.placement import Placement

    n = cuda_count()
    ids = ",".join(str(i) for i in range(n))
    req = launch_cmd.LaunchRequest("smoke/a_only", (f"training.output_dir={tmp_path}",), Placement.from_flags(gpus=ids))
    env = child_env()
    env.pop("CUDA_VISIBLE_DEVICES", None)
    lp = launch_cmd.plan_launch(req, env)
    argv = lp.plan.learner.argv
    assert lp.plan.learner.env["CUDA_VISIBLE_DEVICES"] == ids and argv[argv.index("--nproc_per_node") + 1] == str(n)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    cut = len(argv) - argv[::-1].index("-m") - 1  # the entry point's `-m toolkit.train`
    lp.plan.learner.argv = argv[:cut] + [str(probe), str(tmp_path)]
    outcome = Supervisor(grace=5).run(lp.plan)
    assert outcome.exit_code == 0, (tmp_path / "logs" / "learner.log").read_text()[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]
    assert [s["cvd"] for s in seen] == [ids] * n and all(s["count"] == n for s in seen)
    assert len({s["uuid"] for s in seen}) == n  # one distinct GPU per rank
