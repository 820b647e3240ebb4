"""The CLI path never imports heavy engines: --help, lint-profiles, config, preflight and launch
(--help, --dry-run, and a real launch up to the moment it spawns its first child) leave
torch/transformers/deepspeed/vllm/fastapi out of sys.modules (fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _config_helpers import REPO
from _shared import HEAVY, heavy, stage2_in_fresh_python

RUNS = [
    ["--help"],
    ["lint-profiles", "--help"],
    ["config", "--help"],
    ["preflight", "--help"],
    ["lint-profiles", "configs/"],
    ["config", "--profile", "smoke/ab_mixed"],
    ["preflight", "--profile", "smoke/ab_mixed"],
    ["preflight", "--profile", "prod/ab_mixed", "--gpus", "0,1"],
    ["launch", "--help"],
    ["launch", "-p", "smoke/ab_mixed", "--gpus", "cpu", "--nproc", "2", "--dry-run"],
    [
        "launch",
        "-p",
        "smoke/ab_mixed",
        "--gpus",
        "0,1",
        "--dry-run",
        "--set",
        "rollout_matching.rollout_backend=vllm",
        "--set",
        "rollout_matching.vllm.mode=server",
        "--server-gpus",
        "2,3",
        "--launcher",
        "deepspeed",
    ],
]


def test_commands_import_nothing_heavy(tmp_path):
    # The launches get their own output dir: the profile's own may hold the README demo's run, which a launch
    # refuses to overwrite (a dry run too).
    out = ["--set", f"training.output_dir={tmp_path}"]
    runs = [run + out if run[0] == "launch" and "--dry-run" in run else run for run in RUNS]
    codes, modules = stage2_in_fresh_python(
        runs, "toolkit.config", "toolkit.preflight", "launchers.supervisor", "launchers.probe"
    )
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


# The real `stage2-launch` console entry point, run until its supervisor spawns the first child.
# `subprocess.Popen` is replaced only to STOP the launch at that moment: the replacement records what was
# loaded and the argv it was handed, then ends the process before anything is spawned. Every step before it
# (flags → Placement, profile, preflight contract, topology, run folder, file and GPU checks, the supervisor's
# set-up) is the product's own code; the patch is a stop point, not a fake of the behaviour under test.
SPAWN_POINT = """
import json, os, subprocess, sys
from importlib.metadata import entry_points

dump = sys.argv[1]

def stop_at_spawn(argv, *args, **kwargs):
    with open(dump, "w") as fh:
        json.dump({"argv": list(argv), "modules": sorted(sys.modules)}, fh)
    os._exit(0)  # nothing spawned, nothing to clean up

subprocess.Popen = stop_at_spawn
[entry] = entry_points(group="console_scripts", name="stage2-launch")
sys.argv = ["stage2-launch", *sys.argv[2:]]
entry.load()()
"""


def test_launch_reaches_the_spawn_point_importing_nothing_heavy(tmp_path):
    dump = tmp_path / "spawn.json"
    args = ["--profile", "smoke/ab_mixed", "--gpus", "cpu", "--set", f"training.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [sys.executable, "-c", SPAWN_POINT, str(dump), *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and dump.is_file(), proc.stderr  # the launch got as far as starting a child
    out = json.loads(dump.read_text())
    assert out["argv"][1:3] == ["-m", "toolkit.torchrun"] and "toolkit.train" in out["argv"]  # the learner
    assert "launchers.supervisor" in out["modules"] and "toolkit.preflight" in out["modules"]
    assert heavy(out["modules"]) == []
    assert [m for m in out["modules"] if m.startswith("toolkit.trainer")] == []  # the layout comes from runlayout
