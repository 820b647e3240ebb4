"""No code from checkpoints (issue 15, item 4): `--resume` reads the RNG state weights-only and scans
DeepSpeed's pickles for Python globals before DeepSpeed's own `torch.load(weights_only=False)` runs them.

A planted pickle here is the real attack: a class whose `__reduce__` makes unpickling call `open(marker, "w")`
(a visible side effect without a shell). Every refusal must leave the marker absent.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _shared import child_env

from toolkit import runlayout
from toolkit.trainer import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]


class Planted:
    """Unpickling this calls builtins.open(marker, "w"): code chosen by whoever wrote the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_round_trip_is_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian in the NumPy state (has_gauss = 1)
    ckpt.save_rng(tmp_path, rank=0)
    expected = _draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.load_rng(tmp_path, rank=0)
    assert _draws() == expected
    torch.load(tmp_path / "rng" / "rank0.pt", weights_only=True)  # loads with no allow-listed globals


def test_planted_rng_pickle_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "rng").mkdir()
    torch.save({"format": 1, "python": Planted(marker)}, tmp_path / "rng" / "rank0.pt")
    with pytest.raises(ckpt.CheckpointError, match="refused") as info:
        ckpt.read_rng(tmp_path, rank=0)
    assert str(tmp_path / "rng" / "rank0.pt") in str(info.value) and "fix:" in str(info.value)
    assert not marker.exists()


def test_old_pickled_layout_is_refused_with_a_reason(tmp_path):
    """The layout before weights-only (a NumPy array inside a pickle) cannot be read weights-only."""
    (tmp_path / "rng").mkdir()
    torch.save(
        {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        tmp_path / "rng" / "rank0.pt",
    )
    with pytest.raises(ckpt.CheckpointError, match="older layout, damaged, or tampered with"):
        ckpt.read_rng(tmp_path, rank=0)


@pytest.mark.parametrize("content", [{"format": 1}, {"format": 2}, [1, 2], b"not a zip"])
def test_wrong_rng_contents_are_refused(tmp_path, content):
    (tmp_path / "rng").mkdir()
    path = tmp_path / "rng" / "rank0.pt"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.read_rng(tmp_path, rank=0)


def test_missing_rng_and_bad_trainer_state(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="RNG state missing"):
        ckpt.read_rng(tmp_path, rank=3)
    (tmp_path / runlayout.STATE_FILE).write_text(json.dumps({"step": 4, "evil": 1}))
    with pytest.raises(ckpt.CheckpointError, match="not a trainer state"):
        ckpt.read_state(tmp_path)
    (tmp_path / runlayout.STATE_FILE).write_bytes(b"\xff{")
    with pytest.raises(ckpt.CheckpointError, match="not a trainer state"):
        ckpt.read_state(tmp_path)


def test_trainer_state_of_an_older_version_still_loads(tmp_path):
    """Earlier trainer_state.json files carry schedule_b_ratio (a copy of the profile's, never read): ignored."""
    old = {
        "step": 6,
        "best_metric": 0.5,
        "best_step": 4,
        "metric_name": "rollout/f1",
        "schedule_b_ratio": 0.5,
        "b_steps": 3,
        "history": [[4, 0.5]],
        "run_id": "abc",
    }
    (tmp_path / ckpt.STATE_FILE).write_text(json.dumps(old))
    state = ckpt.read_state(tmp_path)
    assert (state.step, state.b_steps, state.best_step, state.run_id) == (6, 3, 4, "abc")
    assert not hasattr(state, "schedule_b_ratio")


SAVE_DS = """
import sys, torch
from toolkit.trainer.distributed import init_distributed
from toolkit.trainer.engine import Stage2Engine
init_distributed()
for name, cfg, dtype in [("zero2", {"zero_optimization": {"stage": 2}}, torch.float32),
                         ("zero3", {"zero_optimization": {"stage": 3}}, torch.float32),
                         ("zero2_bf16", {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, torch.bfloat16),
                         ("zero0", {"zero_optimization": {"stage": 0}}, torch.float32)]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    Stage2Engine(model, opt, sched, cfg).save(sys.argv[1] + "/" + name + "/ds", client_state={"step": 1})
"""


@pytest.fixture(scope="module")
def ds_checkpoints(tmp_path_factory) -> Path:
    """Real DeepSpeed saves (one CPU process) for the ZeRO stages and dtypes the toolkit runs."""
    root = tmp_path_factory.mktemp("ds")
    env = child_env()
    proc = subprocess.run(
        [sys.executable, "-c", SAVE_DS, str(root)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_real_deepspeed_checkpoints_pass_the_scan(ds_checkpoints):
    """DEEPSPEED_GLOBALS covers what this DeepSpeed writes (a DeepSpeed upgrade that adds a class fails here)."""
    for name in ("zero2", "zero3", "zero2_bf16", "zero0"):
        assert list((ds_checkpoints / name / "ds").rglob("*.pt")), name
        ckpt.check_deepspeed_files(ds_checkpoints / name / "ds")


def test_planted_deepspeed_pickle_is_refused_naming_the_global(ds_checkpoints, tmp_path):
    marker = tmp_path / "pwned"
    [model_file] = (ds_checkpoints / "zero0" / "ds").rglob("mp_rank_00_model_states.pt")
    planted = tmp_path / "ds" / "global_step0" / model_file.name
    planted.parent.mkdir(parents=True)
    state = torch.load(model_file, weights_only=False)  # our own test file: trusted
    state["extra"] = Planted(marker)
    torch.save(state, planted)
    with pytest.raises(ckpt.CheckpointError, match=r"\(io\.open\)") as info:
        ckpt.check_deepspeed_files(tmp_path / "ds")
    assert str(planted) in str(info.value) and "could run code" in str(info.value)
    assert not marker.exists()


def test_non_archive_deepspeed_file_is_refused(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "x.pt").write_bytes(b"\x80\x02}q\x00.")  # a bare (legacy, non-zip) pickle
    with pytest.raises(ckpt.CheckpointError, match="not a torch checkpoint archive"):
        ckpt.check_deepspeed_files(tmp_path / "ds")


@pytest.mark.parametrize("where", ["rng", "ds"])
def test_train_resume_refuses_a_planted_checkpoint(tmp_path, where):
    """The attack end to end: `stage2 train --resume DIR` on a planted checkpoint exits 1 with one message."""
    marker = tmp_path / "pwned"
    step = tmp_path / "out" / "checkpoints" / "step-000004"
    (step / "rng").mkdir(parents=True)
    (step / "ds" / "global_step4").mkdir(parents=True)
    ckpt.write_state(step, ckpt.TrainerState(step=4))
    if where == "rng":
        torch.save({"format": 1, "python": Planted(marker)}, step / "rng" / "rank0.pt")
    else:
        ckpt.save_rng(step, rank=0)
        torch.save({"module": Planted(marker)}, step / "ds" / "global_step4" / "mp_rank_00_model_states.pt")
    env = child_env()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "toolkit.train",
            "--profile",
            "smoke/a_only",
            "--resume",
            str(step),
            "--set",
            f"training.output_dir={tmp_path / 'out'}",
            "--set",
            f"training.logging_dir={tmp_path / 'tb'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "refused" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()
