"""The vLLM backends on the new families, through the public entry point and over the real server:
- colocate: two steps (A, B) of `smoke/vlm_qwen3_ab_mixed` (Qwen3-VL Stage-1, DoRA merged into the engine);
- server: a `python -m toolkit.rollout.server` (one DP engine) serving the Qwen2.5-VL Stage-1 (Qwen3-VL:
  `slow`): fp32 greedy rollouts over HTTP equal HF's before and after a weight push (vision tower only),
  then two steps of `smoke/vlm_ab_mixed` on that model in server mode.
Parity of every update kind per family is tests/rollout_vllm/test_vlm_families.py (colocate)."""

import copy

import pytest
from _shared import free_port, shape_images
from _vllm_helpers import run_train, server_settings, serving
from _vlm_families import family_dir, load_hf
from _vlm_helpers import EOS, hf_greedy, perturb, settings, vlm_batch, weights_of
from test_vlm_smoke_runs import check_vlm_run

from toolkit.rollout.backends.vllm_server import VLLMServerBackend

pytestmark = pytest.mark.vllm


def test_qwen3_vl_smoke_profile_colocate(tmp_path):
    proc = run_train("smoke/vlm_qwen3_ab_mixed", tmp_path, "rollout_matching.vllm.mode=colocate")
    check_vlm_run(proc, tmp_path)
    assert "DoRA r=16" in proc.stderr


# Qwen2.5-VL in CI; Qwen3-VL over the server is `slow` (its engine is the colocate one, tested in CI).
SERVED = [pytest.param("qwen2_5_vl"), pytest.param("qwen3_vl", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=SERVED)
def family_server(request, tmp_path_factory):
    yield from serving(family_dir(request.param, stage1=True), tmp_path_factory.mktemp(f"serve_{request.param}"), dp=1)


def test_server_greedy_equals_hf_before_and_after_a_tower_update(family_server, tmp_path):
    model_dir = family_server.model
    prompts, images = vlm_batch(model_dir, shape_images(tmp_path))
    learner = copy.deepcopy(load_hf(model_dir))
    srv = server_settings(family_server.url, free_port(), infer_timeout_s=300.0)
    backend = VLLMServerBackend.from_settings(
        srv, settings(2), bucket_size_mb=1, eos_id=EOS, rank=0, world_size=1, weights=weights_of(learner)
    )  # runs the weight-name check
    try:
        before = backend.generate(prompts, step=0, images=images)
        assert [r.completion_ids for r in before] == hf_greedy(learner, model_dir, prompts, images)
        assert [r.prompt_ids for r in before] == prompts
        perturb(learner, seed=5, prefix="model.visual.blocks.", scale=0.5)
        after = backend.generate(prompts, step=1, images=images)  # a new step pushes the weights first
    finally:
        backend.close()
    want = hf_greedy(learner, model_dir, prompts, images)
    assert [r.completion_ids for r in after] == want
    assert want[:3] != [r.completion_ids for r in before][:3], "the tower update should change the image rollouts"


def test_smoke_run_in_server_mode(family_server, tmp_path):
    servers = f'rollout_matching.vllm.server.servers=[{{base_url: "{family_server.url}", group_port: {free_port()}}}]'
    proc = run_train(
        "smoke/vlm_ab_mixed",
        tmp_path,
        "rollout_matching.vllm.mode=server",
        servers,
        f"model.model={family_server.model}",
        "tuner.train_type=full",
    )
    check_vlm_run(proc, tmp_path)
