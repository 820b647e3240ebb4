"""`training.report_to: [wandb]` (toolkit/trainer/wandb_log.py) in offline mode: a real run, a real resume.

WANDB_MODE=offline: no network; wandb writes `<output_dir>/wandb/offline-run-*-<id>/` with the run's
config and summary, which is what `wandb sync` would upload.
"""
from __future__ import annotations

import json

import pytest
import yaml
from _e2e_runs import run_train

from toolkit.config import load_profile
from toolkit.trainer import wandb_log

WANDB = ("training.report_to=[jsonl, wandb]", "training.wandb_project=stage2-test", "training.run_name=wb_smoke",
         "training.eval_steps=2", "training.save_steps=2")


def _runs(out):
    return sorted((out / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_offline_run_has_the_config_the_metrics_and_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    proc = run_train("smoke/ab_mixed", out, *WANDB, "training.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (first,) = _runs(out)
    run_id = (out / "wandb_run_id").read_text().strip()
    assert first.name.endswith(run_id)
    config = yaml.safe_load((first / "files" / "config.yaml").read_text())
    assert config["training"]["value"]["run_name"] == "wb_smoke"
    assert config["training"]["value"]["wandb_project"] == "stage2-test"
    summary = json.loads((first / "files" / "wandb-summary.json").read_text())
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["_step"] == last["step"]
    for key in ("loss/total", "eval_rollout/f1", "train/learning_rate"):
        assert summary[key] == pytest.approx(last[key]), key  # the same numbers as metrics.jsonl
    assert summary["eval_pictures/val-000001"]["_type"] == "image-file"

    proc = run_train("smoke/ab_mixed", out, *WANDB, "training.max_steps=3", resume="auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _runs(out)
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # the same W&B run, continued
    summary = json.loads((runs[-1] / "files" / "wandb-summary.json").read_text())
    assert summary["_step"] == json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]


def test_missing_wandb_names_the_extra(monkeypatch):
    import importlib.util

    cfg = load_profile("smoke/ab_mixed", ("training.report_to=[jsonl, wandb]",))
    real = importlib.util.find_spec
    # Fake (labelled): an environment without wandb, which this venv cannot be while wandb is installed.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(Exception, match=r"training.report_to: wandb is listed but the wandb package is not installed "
                                        r"\(fix: pip install -e '.\[wandb\]'"):
        wandb_log.with_wandb(object(), cfg, 1, "/nonexistent", resumed=False)


def test_other_ranks_and_other_sinks_get_the_plain_writer():
    writer = object()
    cfg = load_profile("smoke/ab_mixed", ())
    assert wandb_log.with_wandb(writer, cfg, 0, "/nonexistent", resumed=False) is writer
    cfg = load_profile("smoke/ab_mixed", ("training.report_to=[jsonl, wandb]",))
    assert wandb_log.with_wandb(writer, cfg, 1, "/nonexistent", resumed=False) is writer
