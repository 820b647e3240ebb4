"""The CLI path never imports heavy engines: --help, lint-profiles, config, preflight and launch
(--help, --dry-run) leave torch/transformers/deepspeed/vllm/fastapi out of sys.modules (fresh interpreter)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from _config_helpers import REPO
from _shared import HEAVY, heavy, stage2_in_fresh_python

RUNS = [["--help"], ["lint-profiles", "--help"], ["config", "--help"], ["preflight", "--help"],
        ["lint-profiles", "configs/"], ["config", "--profile", "smoke/ab_mixed"],
        ["preflight", "--profile", "smoke/ab_mixed"], ["preflight", "--profile", "prod/ab_mixed", "--gpus", "0,1"],
        ["launch", "--help"], ["launch", "-p", "smoke/ab_mixed", "--gpus", "cpu", "--nproc", "2", "--dry-run"],
        ["launch", "-p", "smoke/ab_mixed", "--gpus", "0,1", "--dry-run", "--set", "rollout_matching.rollout_backend=vllm",
         "--set", "rollout_matching.vllm.mode=server", "--server-gpus", "2,3", "--launcher", "deepspeed"]]


def test_commands_import_nothing_heavy():
    codes, modules = stage2_in_fresh_python(RUNS, "toolkit.config", "toolkit.preflight", "launchers.supervisor",
                                            "launchers.probe")
    assert set(codes) <= {0, None}, codes
    assert len(codes) == 11
    assert heavy(modules) == []
    assert "launchers.cli" in modules and "toolkit.preflight" in modules
    assert "launchers.launch_cmd" in modules


@pytest.mark.parametrize("module", ["toolkit.config", "toolkit.preflight", "launchers.cli"])
def test_modules_import_nothing_heavy(module):
    code = f"import sys, {module}; print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r}])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr
