"""The image path through the public entry point: `python -m toolkit.train --profile smoke/vlm_ab_mixed`
(tiny Qwen2-VL, rendered shapes, HF rollouts, DeepSpeed on CPU), shortened to one A and one B step."""

from __future__ import annotations

import pytest
import torch
from _e2e_runs import ROOT, run_torchrun, run_train
from _shared import metrics

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm_run")
    res = run_train(
        "smoke/vlm_ab_mixed",
        out,
        "training.max_steps=2",
        "training.eval_steps=2",
        "training.save_steps=2",
        "rollout_matching.max_new_tokens=64",
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return out


def test_vlm_smoke_trains_both_channels_on_images(vlm_run):
    rows = metrics(vlm_run)
    assert [r["channel"] for r in rows] == ["A", "B"]
    a, b = rows
    assert a["stage2/segments"] == 8 and a["loss/total"] > 0
    assert b["rollout/samples"] == 8 and b["rollout/prompt_mismatch_rate"] == 0  # HF decodes the learner's prompt
    assert b["stage2/segments"] + b["stage2/dropped_samples"] == 8
    assert b["eval_rollout/samples"] == 4


def test_vlm_export_loads_with_its_processor_and_the_vision_tower_trained(vlm_run):
    """vit_lr > 0 in the profile: the exported tower differs from the start; the export is self-contained."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from toolkit.trainer.samples import load_samples  # noqa: F401  (import check: trainer side is importable)

    hf = vlm_run / "checkpoints" / "step-000002" / "hf"
    AutoProcessor.from_pretrained(hf, trust_remote_code=True)
    AutoModelForImageTextToText.from_pretrained(hf)
    start = load_file(ROOT / "assets" / "vlm" / "stage1" / "model.safetensors")
    end = load_file(hf / "model.safetensors")
    tower = [k for k in start if "visual.blocks." in k and k.endswith("weight")]  # saved as visual.* (legacy names)
    assert tower and any(not torch.equal(start[k], end[k]) for k in tower)


def test_vlm_lora_run_exports_merged_weights_with_the_tower_trained_in_full(tmp_path):
    """LoRA adapters on the language model only; the vision tower (vit_lr > 0) trains in full and is exported."""
    from safetensors.torch import load_file

    res = run_train(
        "smoke/vlm_ab_mixed",
        tmp_path,
        "training.max_steps=1",
        "training.save_steps=1",
        "training.eval_strategy=no",
        "tuner.train_type=lora",
        "tuner.lora_rank=4",
    )
    assert res.returncode == 0, res.stderr[-4000:]
    start = load_file(ROOT / "assets" / "vlm" / "stage1" / "model.safetensors")
    end = load_file(tmp_path / "checkpoints" / "step-000001" / "hf" / "model.safetensors")
    assert set(end) == set(start)  # merged: no lora_A/lora_B tensors, the original names
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert any("visual.blocks." in k for k in changed)  # full-weight tower update
    assert any("q_proj" in k for k in changed)  # merged LoRA delta on the language model


def test_vlm_two_ranks_zero3_match_one_rank_zero2(tmp_path):
    """Images under ZeRO-3 on 2 CPU ranks (gathered generate, sharded vision tower) log the same step losses as
    one ZeRO-2 rank: same samples, same greedy rollouts. Packing off, so the logged loss (a segment-weighted
    mean of per-pack means) does not depend on how segments are split across ranks."""
    sets = (
        "training.max_steps=2",
        "training.eval_strategy=no",
        "training.save_strategy=no",
        "training.packing=false",
        "rollout_matching.max_new_tokens=64",
    )
    one = run_train("smoke/vlm_ab_mixed", tmp_path / "one", *sets)
    two = run_torchrun(2, "smoke/vlm_ab_mixed", tmp_path / "two", "deepspeed.config=zero3", *sets)
    assert one.returncode == 0, one.stderr[-4000:]
    assert two.returncode == 0, two.stdout[-4000:]
    rows_one, rows_two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["channel"] for r in rows_two] == ["A", "B"]
    assert rows_two[1]["rollout/prompt_mismatch_rate"] == 0 and rows_two[1]["rollout/samples"] == 8
    for a, b in zip(rows_two, rows_one):
        assert a["loss/total"] == pytest.approx(b["loss/total"], rel=1e-5)
