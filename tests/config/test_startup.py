"""The CLI path never imports heavy engines: --help, lint-profiles, config, preflight and launch
(--help, --dry-run) leave torch/transformers/deepspeed/vllm/fastapi out of sys.modules (fresh interpreter)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _config_helpers import REPO

HEAVY = ("torch", "transformers", "deepspeed", "vllm", "fastapi")

SCRIPT = """
import json, sys, contextlib, io
from launchers.cli import main, lint_main
runs = [["--help"], ["lint-profiles", "--help"], ["config", "--help"], ["preflight", "--help"],
        ["lint-profiles", "configs/"], ["config", "--profile", "smoke/ab_mixed"],
        ["preflight", "--profile", "smoke/ab_mixed"], ["preflight", "--profile", "prod/ab_mixed", "--gpus", "0,1"],
        ["launch", "--help"], ["launch", "-p", "smoke/ab_mixed", "--gpus", "cpu", "--nproc", "2", "--dry-run"],
        ["launch", "-p", "smoke/ab_mixed", "--gpus", "0,1", "--dry-run", "--set", "rollout_matching.rollout_backend=vllm",
         "--set", "rollout_matching.vllm.mode=server", "--server-gpus", "2,3", "--launcher", "deepspeed"]]
codes = []
for args in runs:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main.main(args=args, prog_name="stage2", standalone_mode=False)
            codes.append(0)
        except SystemExit as exc:
            codes.append(exc.code)
import toolkit.config, toolkit.preflight, launchers.supervisor, launchers.probe
print(json.dumps({"codes": codes, "modules": sorted(sys.modules)}))
"""


def test_commands_import_nothing_heavy():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["codes"]) <= {0, None}, out["codes"]
    assert len(out["codes"]) == 11
    heavy = [m for m in out["modules"] if m.split(".")[0] in HEAVY]
    assert heavy == []
    assert "launchers.cli" in out["modules"] and "toolkit.preflight" in out["modules"]
    assert "launchers.launch_cmd" in out["modules"]


@pytest.mark.parametrize("module", ["toolkit.config", "toolkit.preflight", "launchers.cli"])
def test_modules_import_nothing_heavy(module):
    code = f"import sys, {module}; print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r}])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr
