"""Server mode with images on real vLLM: a `python -m toolkit.rollout.server --dp 2` serving the tiny Qwen2-VL
(started once for this module), the pytest process as the fp32 HF learner. Image paths travel as absolute
paths (learner and server share the filesystem); the server reads them, collapses the pads and answers
with the engine's expanded prompt. Weights, the vision tower included, go over the gloo group."""

import copy

import pytest
import requests
from _shared import free_port, shape_images, tiny_vlm_dir
from _vllm_helpers import run_train, server_settings, serving
from _vlm_helpers import EOS, hf_greedy, hf_learner, perturb, settings, vlm_batch, weights_of

from toolkit.rollout.backends.vllm_server import VLLMServerBackend

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vlm_server(tmp_path_factory):
    yield from serving(tiny_vlm_dir(), tmp_path_factory.mktemp("serve_vlm"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    return shape_images(tmp_path_factory.mktemp("images"))  # absolute paths: 16, 12 and 8 image pads


@pytest.fixture(scope="module")
def batch(images):
    return vlm_batch(tiny_vlm_dir(), images)  # 3 image prompts + 1 text prompt, expanded as the learner does


@pytest.fixture(scope="module")
def learner():
    return copy.deepcopy(hf_learner(tiny_vlm_dir()))


def backend_for(server, learner) -> VLLMServerBackend:
    return VLLMServerBackend.from_settings(
        server_settings(server.url, free_port()),
        settings(2),
        bucket_size_mb=1,
        eos_id=EOS,
        rank=0,
        world_size=1,
        weights=weights_of(learner),
    )


def infer_body(prompts, images, request_id: str) -> dict:
    return {"request_id": request_id, "prompts": prompts, "images": images, "sampling": [{"max_tokens": 4}]}


def test_rollouts_with_images_equal_hf_and_carry_expanded_prompts(vlm_server, learner, batch):
    prompts, images = batch
    backend = backend_for(vlm_server, learner)
    try:
        assert backend.chunk == 4  # one round, split 2 + 2 over the DP ranks: each rank gets its own images
        rollouts = backend.generate(prompts, step=0, images=images)
    finally:
        backend.close()
    assert [r.completion_ids for r in rollouts] == hf_greedy(learner, tiny_vlm_dir(), prompts, images)
    assert [r.prompt_ids for r in rollouts] == prompts  # the engine expanded the collapsed pads back exactly
    assert {r.weight_version for r in rollouts} == {1}


def test_weight_sync_with_vision_tower_changes_outputs(vlm_server, learner, batch):
    prompts, images = batch
    backend = backend_for(vlm_server, learner)
    try:
        before = [r.completion_ids for r in backend.generate(prompts, step=10, images=images)]
        perturb(learner, seed=3)  # every weight
        after = [r.completion_ids for r in backend.generate(prompts, step=11, images=images)]
        assert after != before
        assert after == hf_greedy(learner, tiny_vlm_dir(), prompts, images)
        # Only the vision tower, the same images: stale vision weights or a cached image embedding would show.
        perturb(learner, seed=4, prefix="model.visual.", scale=0.5)
        vision = [r.completion_ids for r in backend.generate(prompts, step=12, images=images)]
        assert vision[:3] != after[:3]
        assert vision == hf_greedy(learner, tiny_vlm_dir(), prompts, images)
        assert requests.get(vlm_server.url + "/info/", timeout=5).json()["weight_version"] == 13
    finally:
        backend.close()


def test_bad_image_paths_are_400_naming_the_path(vlm_server, batch, tmp_path):
    prompts, images = batch
    missing = str(tmp_path / "nope.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    cases = {missing: [[missing]], "relative.png": [["relative.png"]], str(broken): [[str(broken)]]}
    for i, (path, paths) in enumerate(cases.items()):
        resp = requests.post(vlm_server.url + "/infer/", json=infer_body(prompts[:1], paths, f"bad-{i}"), timeout=60)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"] == "BadRequest" and path in resp.json()["detail"]
    resp = requests.post(
        vlm_server.url + "/infer/", json=infer_body(prompts[:2], [list(images[0])], "bad-n"), timeout=60
    )
    assert resp.status_code == 400 and "2 prompts but 1 image entries" in resp.json()["detail"], resp.text
    assert requests.get(vlm_server.url + "/health/", timeout=5).status_code == 200  # no worker died


def test_weights_schema_uses_learner_names_and_lists_mismatches(vlm_server, learner):
    served = {t["name"] for t in requests.get(vlm_server.url + "/weights_schema/", timeout=5).json()["tensors"]}
    assert served == {n for n, _ in learner.named_parameters()}  # model.visual.*, model.language_model.*, lm_head
    srv = server_settings(vlm_server.url, free_port(), infer_timeout_s=60.0)
    legacy = lambda device: ((n.replace("model.visual.", "visual."), p.detach()) for n, p in learner.named_parameters())  # noqa: E731
    with pytest.raises(ValueError) as err:
        VLLMServerBackend.from_settings(
            srv, settings(2), bucket_size_mb=1, eos_id=EOS, rank=0, world_size=1, weights=legacy
        )
    msg = str(err.value)
    assert vlm_server.url in msg and "not sent by the learner: model.visual.blocks.0.attn.proj.bias" in msg
    assert "unknown to the served checkpoint: visual.blocks.0.attn.proj.bias" in msg


def test_client_prompt_check_tolerates_pad_runs_only():
    # An image prompt may come back with another number of pads (the learner's parity check drops it);
    # any other difference is still an order/content error of the server.
    from toolkit.rollout.backends.vllm_server import _same_prompt

    assert _same_prompt([5, 9, 9, 6], [5, 9, 9, 9, 9, 6], has_images=True)
    assert not _same_prompt([5, 9, 9, 6], [5, 9, 9, 9, 9, 6], has_images=False)
    assert not _same_prompt([5, 9, 6], [5, 9, 7], has_images=True)


def test_vlm_smoke_run_in_server_mode(vlm_server, tmp_path):
    """smoke/vlm_ab_mixed against this server (the learner starts from the server's tiny model)."""
    from test_vlm_smoke_runs import check_vlm_run

    servers = f'rollout_matching.vllm.server.servers=[{{base_url: "{vlm_server.url}", group_port: {free_port()}}}]'
    proc = run_train(
        "smoke/vlm_ab_mixed", tmp_path, "rollout_matching.vllm.mode=server", servers, f"model.model={vlm_server.model}"
    )
    check_vlm_run(proc, tmp_path)
    assert "weight sync v2" in proc.stderr  # the B step (step 1) pushed the learner's weights first
