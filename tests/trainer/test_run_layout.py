"""A run owns its folder (toolkit/runlayout.py): refusal with the fix, --overwrite moves aside, --resume auto
checks the config, pruning keeps other runs' checkpoints, TensorBoard follows output_dir. No torch here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toolkit import runlayout
from toolkit.runlayout import RunFolderError, claim_run_folder

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"training": {"learning_rate": 1e-4, "max_steps": 4, "output_dir": "/x"}, "model": {"model": "/m"}}


def _fake_run(out: Path, steps=(1, 2), run_id="r1", config=CONFIG) -> None:
    """The files a finished run leaves (metrics lines, complete checkpoints, resolved config)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in steps))
    (out / "resolved_config.yaml").write_text("# resolved from: x\n" + yaml.safe_dump(config))
    for s in steps:
        ckpt = runlayout.checkpoint_dir(out, s)
        ckpt.mkdir(parents=True)
        (ckpt / runlayout.STATE_FILE).write_text(json.dumps({"step": s, "run_id": run_id}))


def test_an_empty_folder_or_one_with_only_logs_is_free(tmp_path):
    assert claim_run_folder(tmp_path / "new", CONFIG) == []
    (tmp_path / "failed" / "logs").mkdir(parents=True)  # a launch that failed before the first step
    (tmp_path / "failed" / "resolved_config.yaml").write_text("a: 1\n")
    assert claim_run_folder(tmp_path / "failed", CONFIG) == []


def test_a_fresh_run_refuses_a_folder_holding_another_run_and_says_the_fix(tmp_path):
    _fake_run(tmp_path / "out")
    with pytest.raises(RunFolderError) as err:
        claim_run_folder(tmp_path / "out", CONFIG)
    text = str(err.value)
    assert "already holds another run" in text and "metrics.jsonl (2 steps)" in text and "step-000002" in text
    assert "--resume auto" in text and "training.output_dir" in text and "--overwrite" in text
    assert (tmp_path / "out" / "checkpoints" / "step-000001").is_dir()  # nothing touched


def test_overwrite_moves_the_old_run_aside_never_deletes(tmp_path):
    out, tb = tmp_path / "out", tmp_path / "tb"
    _fake_run(out)
    tb.mkdir()
    (tb / "events.out.tfevents.1.host").write_text("x")
    assert claim_run_folder(out, CONFIG, overwrite=True, act=False) == [f"--overwrite: would move {out} aside"]
    assert (out / "metrics.jsonl").is_file()  # a dry run moves nothing
    notes = claim_run_folder(out, CONFIG, overwrite=True, logging_dir=tb)
    assert not out.exists() and not tb.exists() and len(notes) == 2
    moved = sorted(tmp_path.glob("out.old-*"))
    assert len(moved) == 1 and (moved[0] / "checkpoints" / "step-000002" / runlayout.STATE_FILE).is_file()
    assert len(list(tmp_path.glob("tb.old-*/events.out.tfevents.*"))) == 1


def test_resume_auto_continues_only_a_run_with_the_same_config(tmp_path):
    out = tmp_path / "out"
    _fake_run(out)
    longer = {**CONFIG, "training": {**CONFIG["training"], "max_steps": 8}}
    assert claim_run_folder(out, longer, resume="auto") == ["resume: training.max_steps changed 4 → 8"]
    other = {**CONFIG, "training": {**CONFIG["training"], "learning_rate": 1e-3}}
    with pytest.raises(RunFolderError, match=r"training.learning_rate: 0.0001 → 0.001") as err:
        claim_run_folder(out, other, resume="auto")
    assert "--resume <checkpoint dir>" in str(err.value)
    # an explicit checkpoint of this folder continues whatever differs, saying what
    ckpt = str(runlayout.checkpoint_dir(out, 2))
    assert claim_run_folder(out, other, resume=ckpt) == ["resume: training.learning_rate changed 0.0001 → 0.001"]
    newer = {**CONFIG, "training": {**CONFIG["training"], "new_key": 1}}  # a key a newer toolkit added
    assert claim_run_folder(out, newer, resume="auto") == ["resume: training.new_key changed (absent) → 1"]
    with pytest.raises(RunFolderError, match="pass only one"):
        claim_run_folder(out, CONFIG, resume="auto", overwrite=True)


def test_pruning_never_touches_another_runs_checkpoints(tmp_path):
    from toolkit.trainer.checkpoint import rotate

    _fake_run(tmp_path, steps=(6, 7), run_id="old")
    for s in (1, 2, 3):
        ckpt = runlayout.checkpoint_dir(tmp_path, s)
        ckpt.mkdir(parents=True)
        (ckpt / runlayout.STATE_FILE).write_text(json.dumps({"step": s, "run_id": "new"}))
    removed = rotate(tmp_path, keep=1, protect=set(), run_id="new")
    assert [p.name for p in removed] == ["step-000001", "step-000002"]
    assert [p.name for p in runlayout.complete_checkpoints(tmp_path)] == ["step-000003", "step-000006", "step-000007"]


def test_tensorboard_follows_output_dir_unless_set(tmp_path):
    from toolkit.config import load_profile

    cfg = load_profile("smoke/ab_mixed", [f"training.output_dir={tmp_path / 'run'}"])
    assert cfg.training.logging_dir == str(tmp_path / "run" / "tb")
    cfg = load_profile(
        "smoke/ab_mixed", [f"training.output_dir={tmp_path / 'run'}", f"training.logging_dir={tmp_path / 'tb'}"]
    )
    assert cfg.training.logging_dir == str(tmp_path / "tb")


def test_the_layout_module_imports_no_torch():
    code = "import sys, toolkit.runlayout, toolkit.cli_options; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
