"""Server mode on real vLLM: one `stage2 serve --dp 2` on 127.0.0.1 for the session (conftest.server).

The pytest process is the learner: an fp32 HF copy of the tiny model whose weights go to the server
over the gloo weight-sync group. Every backend here syncs before its first rollout, so the tests do
not depend on each other's weight versions.
"""

import copy
import socket

import pytest
import requests
import torch
from _shared import greedy_settings
from _vllm_helpers import EOS, server_settings

from toolkit.config.settings import DecodeSettings
from toolkit.rollout.backends.hf import HFBackend
from toolkit.rollout.backends.vllm_server import VLLMServerBackend
from toolkit.rollout.client import RolloutServerError, ServerClient, StaleWeightsError, WeightSyncError

pytestmark = pytest.mark.vllm
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 100, 200, 300, 400, 500], [1, 42], [1, 7, 7, 7, 7], [1, 3], [1, 11, 12]]


def settings(dbs: int = 2) -> DecodeSettings:
    return greedy_settings(max_new_tokens=40, decode_batch_size=dbs, seed=7)


def weights_of(model):
    return lambda device: ((n, p.detach().to(device)) for n, p in model.named_parameters())


def perturb(model, seed: int) -> None:
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def free_group_port() -> int:
    from _shared import free_port

    return free_port()


def test_health_world_size_info(server):
    assert requests.get(server.url + "/health/", timeout=5).json() == {"status": "ok", "detail": ""}
    assert requests.get(server.url + "/get_world_size/", timeout=5).json() == {"world_size": 2}
    info = requests.get(server.url + "/info/", timeout=5).json()
    assert info["model"] == str(server.model) and info["max_model_len"] == 1024 and info["dtype"] == "float32"
    assert info["data_parallel_size"] == 2 and isinstance(info["weight_version"], int)


@pytest.fixture(scope="module")
def learner(hf_model):
    return copy.deepcopy(hf_model)


def test_infer_parity_then_weight_update_through_gloo(server, learner):
    srv = server_settings(server.url, free_group_port())
    backend = VLLMServerBackend.from_settings(
        srv, settings(), bucket_size_mb=1, eos_id=EOS, rank=0, world_size=1, weights=weights_of(learner)
    )
    ref = HFBackend(learner, settings(), pad_id=0, eos_id=EOS)
    try:
        assert backend.chunk == 4 and backend.caps == [4]  # dbs 2 × server world 2 / 1 learner
        before = backend.generate(PROMPTS, step=10)
        assert [r.completion_ids for r in before] == [r.completion_ids for r in ref.generate(PROMPTS, step=10)]
        assert {r.weight_version for r in before} == {11}
        perturb(learner, seed=3)
        after = backend.generate(PROMPTS, step=11)  # syncs version 12 first
        assert [r.completion_ids for r in after] != [r.completion_ids for r in before]
        assert [r.completion_ids for r in after] == [r.completion_ids for r in ref.generate(PROMPTS, step=11)]
        assert [r.finish_reason for r in after] == [r.finish_reason for r in ref.generate(PROMPTS, step=11)]
        assert {r.weight_version for r in after} == {12}
        assert requests.get(server.url + "/info/", timeout=5).json()["weight_version"] == 12  # the handshake
        assert backend.last_sync_bytes > 0
    finally:
        backend.close()


def test_stale_version_is_an_error(server, learner):
    srv = server_settings(server.url, free_group_port())
    backend = VLLMServerBackend.from_settings(
        srv, settings(), bucket_size_mb=1, eos_id=EOS, rank=0, world_size=1, weights=weights_of(learner)
    )
    try:
        backend.generate(PROMPTS[:2], step=20)  # pushes version 21
        backend.expected_version = 99  # as if the learner had pushed 99 and the server missed it
        with pytest.raises(StaleWeightsError) as err:
            backend.generate(PROMPTS[:2], step=20)
        assert err.value.status == 409 and server.url in str(err.value) and "learner expects 99" in str(err.value)
    finally:
        backend.close()
    plain = ServerClient(server.url, 0, timeout_s=10, infer_timeout_s=60)
    with pytest.raises(StaleWeightsError):
        plain.infer("stale-1", [[1, 2]], [{"max_tokens": 2}], expect_version=-5)


def test_group_port_taken_names_the_port(server, learner):
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(WeightSyncError) as err:
            VLLMServerBackend.from_settings(
                server_settings(server.url, port),
                settings(),
                bucket_size_mb=1,
                eos_id=EOS,
                rank=0,
                world_size=1,
                weights=weights_of(learner),
            )
    assert f"group_port {port} is already in use" in str(err.value) and server.url in str(err.value)


def test_name_mismatch_listed_before_any_transfer(server, learner):
    def renamed(device):
        for n, p in learner.named_parameters():
            yield (
                ("model.decoder." + n.removeprefix("model.") if n.startswith("model.layers.0.") else n),
                p.detach().to(device),
            )

    with pytest.raises(ValueError) as err:
        VLLMServerBackend.from_settings(
            server_settings(server.url, free_group_port()),
            settings(),
            bucket_size_mb=1,
            eos_id=EOS,
            rank=0,
            world_size=1,
            weights=renamed,
        )
    msg = str(err.value)
    assert server.url in msg and "not sent by the learner: model.layers.0." in msg and "model.decoder.layers.0." in msg


def test_bad_requests_are_422_and_400_naming_the_field(server):
    """Request validation (422) and the engine's own length check (400) on the real engine."""
    base = {"request_id": "bad-0", "prompts": [[1, 2, 3]], "sampling": [{"max_tokens": 2}]}
    zero = requests.post(server.url + "/infer/", json={**base, "sampling": [{"max_tokens": 0}]}, timeout=30)
    assert zero.status_code == 422 and "max_tokens" in zero.text
    bogus = requests.post(server.url + "/infer/", json={**base, "request_id": "bad-1", "bogus": 1}, timeout=30)
    assert bogus.status_code == 422 and "bogus" in bogus.text
    client = ServerClient(server.url, 0, timeout_s=10, infer_timeout_s=60)
    with pytest.raises(RolloutServerError) as err:
        client.infer("bad-2", [[1] * 1100], [{"max_tokens": 2}], None)
    assert err.value.status == 400 and "prompts[0] has 1100 tokens; max_model_len is 1024" in str(err.value)
    assert err.value.url == server.url + "/infer/"


def test_request_id_is_idempotent_on_the_real_engine(server):
    """Sampled decoding without a seed differs call to call; the same request id returns the first answer."""
    sampling = [{"max_tokens": 24, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "seed": None}] * 3
    prompts = [[1, 5, 6], [1, 9], [1, 42, 43]]

    def infer(request_id):
        r = requests.post(
            server.url + "/infer/",
            json={"request_id": request_id, "prompts": prompts, "sampling": sampling},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        return [o["completion_ids"] for o in r.json()["outputs"]]

    first = infer("idem-1")
    assert infer("idem-1") == first  # the cached answer, not a new decode
    assert infer("idem-2") != first  # a new id decodes again (and samples differently)


def test_rounds_and_caps_on_the_real_server(server):
    """Learner rank 1 of 2, decode_batch_size 3, server world 2: 3 requests per round → rounds of 3, 3, 1,
    answers back in prompt order. The client is spied on (wrapped), never replaced."""
    client = ServerClient(server.url, 0, timeout_s=30, infer_timeout_s=120)
    sent, infer = [], client.infer
    client.infer = lambda request_id, prompts, *a, **kw: (
        sent.append(len(prompts)),
        infer(request_id, prompts, *a, **kw),
    )[1]
    backend = VLLMServerBackend([client], settings(dbs=3), eos_id=EOS, rank=1, world_size=2)
    assert (backend.chunk, backend.caps) == (3, [3])
    out = backend.generate(PROMPTS, step=0)
    assert sent == [3, 3, 1] and [r.prompt_ids for r in out] == PROMPTS
