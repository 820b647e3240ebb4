"""Hostile requests against a real `python -m toolkit.rollout.server --dp 1` on the tiny model (127.0.0.1 only).

One server for the module (`hostile`), started with `--image-root` on a temp folder. Every test ends
by checking that a normal request still answers normally: no input may jam the engine, open a file
outside the image roots, leave a store listening, or poison a later unrelated call.
"""

import json
import os
import time
from pathlib import Path

import pytest
import requests
from _shared import child_env, free_port
from _vllm_helpers import ROOT, SERVER_START_TIMEOUT_S, ServerProc, serve_argv, stop, wait_healthy

pytestmark = pytest.mark.vllm
NORMAL = {"prompts": [[1, 5, 6, 7]], "sampling": [{"max_tokens": 4}]}
_ids = iter(range(10**9))


def start_server(model: Path, log_dir: Path, *args: str, sets: tuple[str, ...] = ()) -> ServerProc:
    import subprocess

    port = free_port()
    log = Path(log_dir) / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            serve_argv(model, port, 1, *sets) + list(args),
            cwd=ROOT,
            env=child_env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    srv = ServerProc(proc, f"http://127.0.0.1:{port}", log, model)
    try:
        wait_healthy(srv, SERVER_START_TIMEOUT_S)
    except BaseException:
        stop(proc)
        raise
    return srv


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("image_root")


@pytest.fixture(scope="module")
def hostile(tiny_model, image_root, tmp_path_factory):
    srv = start_server(tiny_model, tmp_path_factory.mktemp("serve_hostile"), "--image-root", str(image_root))
    try:
        yield srv
    finally:
        stop(srv.proc)


def post(srv, path: str, body, timeout: float = 120.0) -> requests.Response:
    """POST raw JSON (json.dumps writes NaN/Infinity as the bare tokens a hostile client sends)."""
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(srv.url + path, data=data, headers={"content-type": "application/json"}, timeout=timeout)


def infer(srv, timeout: float = 120.0, **body) -> requests.Response:
    return post(
        srv, "/infer/", {"request_id": f"h{next(_ids)}-{time.monotonic_ns()}", **NORMAL, **body}, timeout=timeout
    )


def assert_still_normal(srv) -> None:
    assert requests.get(srv.url + "/health/", timeout=10).json() == {"status": "ok", "detail": ""}
    r = infer(srv)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["prompt_ids"] == NORMAL["prompts"][0] and 1 <= len(out["completion_ids"]) <= 4


def detail(r: requests.Response) -> str:
    return json.dumps(r.json()["detail"])


# (body overrides, status, words the answer must name): each once jammed vLLM or answered 500.
JAM = [
    ({"prompts": [[99999]]}, 400, "token id 99999"),
    ({"prompts": [[1, 2**63]]}, 422, "prompts"),
    ({"prompts": [[-1]]}, 422, "prompts"),
    ({"prompts": [[]]}, 422, "prompts"),
    ({"sampling": [{"max_tokens": 4, "seed": 2**63}]}, 422, "seed"),
    ({"sampling": [{"max_tokens": 4, "seed": 2**64 + 5}]}, 422, "seed"),
    ({"sampling": [{"max_tokens": 4, "temperature": 1e308}]}, 422, "temperature"),
    ({"sampling": [{"max_tokens": 4, "temperature": float("inf")}]}, 422, "temperature"),
    ({"sampling": [{"max_tokens": 4, "temperature": float("nan")}]}, 422, "temperature"),
    ({"sampling": [{"max_tokens": 4, "top_p": float("nan")}]}, 422, "top_p"),
    ({"sampling": [{"max_tokens": 4, "repetition_penalty": float("-inf")}]}, 422, "repetition_penalty"),
    ({"sampling": [{"max_tokens": 4, "stop_token_ids": [99999]}]}, 400, "stop_token_ids"),
    ({"sampling": [{"max_tokens": 4, "top_k": 2**40}]}, 422, "top_k"),
    ({"sampling": [{"max_tokens": 2**63}]}, 422, "max_tokens"),
    ({"sampling": [{"max_tokens": 1025}]}, 400, "max_tokens"),
    ({"prompts": [[1] * 1024]}, 400, "max_model_len"),
    ({"expect_weight_version": 2**64}, 422, "expect_weight_version"),
]


@pytest.mark.parametrize("body, status, named", JAM, ids=[j[2] + f"-{i}" for i, j in enumerate(JAM)])
def test_jam_input_is_a_4xx_naming_the_field_then_a_normal_request_answers(hostile, body, status, named):
    r = infer(hostile, **body)
    assert r.status_code == status, r.text
    assert named in detail(r)
    assert_still_normal(hostile)


def test_edge_values_are_served(hostile):
    """The limits are the limits: the largest seed, temperature (2, vLLM's limit) and penalty still decode, and a
    max_tokens
    beyond what the prompt leaves is cut to max_model_len (finish_reason "length")."""
    r = infer(
        hostile,
        sampling=[
            {
                "max_tokens": 3,
                "temperature": 2.0,
                "repetition_penalty": 1000.0,
                "seed": 2**63 - 1,
                "top_k": 2**31 - 1,
                "stop_token_ids": [],
            }
        ],
    )
    assert r.status_code == 200, r.text
    long = infer(hostile, prompts=[[1] * 1020], sampling=[{"max_tokens": 1024}])
    assert long.status_code == 200, long.text
    out = long.json()["outputs"][0]
    assert len(out["completion_ids"]) <= 4 and (len(out["completion_ids"]) == 4) == (out["finish_reason"] == "length")
    assert_still_normal(hostile)


def test_init_communicator_timeout_must_be_finite(hostile):
    for bad in (float("inf"), float("nan"), 1e308, 0, -1):
        r = post(hostile, "/init_communicator/", {"port": free_port(), "world_size": 2, "timeout_s": bad})
        assert r.status_code == 422 and "timeout_s" in detail(r), r.text
    assert_still_normal(hostile)


# ------------------------------------------------------------------ image paths


def test_images_only_under_the_roots_and_one_message_for_missing_and_forbidden(hostile, image_root, tmp_path):
    inside = image_root / "inside.png"
    inside.write_bytes(b"not really a png")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"\x89PNG secret")
    link = image_root / "escape.png"
    link.symlink_to(outside)
    refused = {
        "outside": str(outside),
        "missing-outside": str(tmp_path / "nope.png"),
        "missing-inside": str(image_root / "nope.png"),
        "dotdot": str(image_root / ".." / outside.parent.name / outside.name),
        "symlink": str(link),
        "system": "/etc/hostname",
        "directory": str(image_root),
        "nul": str(image_root) + "/a\x00b.png",
    }
    messages = set()
    for name, path in refused.items():
        r = infer(hostile, images=[[path]])
        assert r.status_code == 400, (name, r.text)
        messages.add(r.json()["detail"].replace(repr(path), "<path>"))
    assert len(messages) == 1, messages  # no existence oracle: missing and forbidden read the same
    assert "image roots" in messages.pop()
    # a file inside the roots gets past the path check (this text model then refuses images at all)
    r = infer(hostile, images=[[str(inside)]])
    assert r.status_code == 400 and "not a vision-language model" in r.json()["detail"], r.text
    assert_still_normal(hostile)


# ------------------------------------------------------------------ the weight-sync store


def listening(port: int) -> list[str]:
    """Local addresses listening on `port` (from /proc/net/tcp{,6}: what `ss -ltn` shows)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                out.append(addr)
    return out


def test_an_open_group_waiting_for_its_learner_blocks_nothing_and_closes(hostile):
    port = free_port()
    r = post(hostile, "/init_communicator/", {"port": port, "world_size": 2, "timeout_s": 300})
    assert r.status_code == 200, r.text
    assert listening(port) == ["0100007F"]
    r = infer(hostile, timeout=30)  # served while the worker waits for a learner that never comes
    assert r.status_code == 200, r.text
    assert post(hostile, "/close_communicator/", {}).json() == {"ok": True}
    assert listening(port) == []
    assert_still_normal(hostile)


def test_store_binds_the_server_address_and_a_failed_join_poisons_nothing(hostile):
    version = requests.get(hostile.url + "/info/", timeout=10).json()["weight_version"]
    port = free_port()
    r = post(hostile, "/init_communicator/", {"port": port, "world_size": 2, "timeout_s": 3})
    assert r.status_code == 200, r.text
    assert listening(port) == ["0100007F"]  # 127.0.0.1 only, like the HTTP server (not *:port)
    # nobody joins: the join fails after 3 s and the store closes; /infer/ is not the one told about it
    assert_still_normal(hostile)
    deadline = time.monotonic() + 60
    while listening(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert listening(port) == []
    assert_still_normal(hostile)
    schema = requests.get(hostile.url + "/weights_schema/", timeout=10).json()["tensors"]
    up = post(hostile, "/update_weights/", {"version": version + 7, "tensors": schema[:1], "last": True})
    assert up.status_code == 200, up.text  # announced; no rank holds a group to receive it
    handshake = post(hostile, "/reset_prefix_cache/", {})
    assert handshake.status_code == 409 and "join failed" in handshake.json()["detail"], handshake.text
    assert requests.get(hostile.url + "/info/", timeout=10).json()["weight_version"] == version  # not -1
    assert post(hostile, "/reset_prefix_cache/", {}).json() == {"weight_version": version}  # reported once
    assert_still_normal(hostile)


# ------------------------------------------------------------------ the fuzz


FUZZ_BATCHES, FUZZ_BATCH = 12, 100  # 1,200 generated requests, a normal request after every batch


def test_fuzz_every_endpoint_no_5xx_and_a_normal_request_after_every_batch(hostile, image_root):
    from _fuzz_requests import Fuzzer

    (image_root / "fuzz.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    tensors = requests.get(hostile.url + "/weights_schema/", timeout=10).json()["tensors"]
    seed = int(os.environ.get("STAGE2_FUZZ_SEED", "15"))
    vocab = json.loads((hostile.model / "config.json").read_text())["vocab_size"]
    fuzz = Fuzzer(seed, vocab=vocab, tensors=tensors, image_files=[str(image_root / "fuzz.png")], free_port=free_port)
    session = requests.Session()
    session.trust_env = False
    statuses: dict[int, int] = {}
    t0 = time.monotonic()
    for _batch in range(FUZZ_BATCHES):
        for _ in range(FUZZ_BATCH):
            method, path, body = fuzz.request()
            try:
                r = session.request(
                    method, hostile.url + path, data=body, timeout=120, headers={"content-type": "application/json"}
                )
            except requests.RequestException as exc:
                pytest.fail(
                    f"seed {seed}, request {fuzz.n}: {method} {path} {body!r:.600}\n→ {exc}\n{hostile.log_tail()}"
                )
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (
                f"seed {seed}, request {fuzz.n}: {method} {path} {body!r:.600}\n→ {r.status_code} "
                f"{r.text[:600]}\n{hostile.log_tail()}"
            )
            if r.status_code >= 400 and r.status_code not in (404, 405):
                assert isinstance(r.json()["detail"], (str, list)), r.text  # a sentence or the fields, as JSON
        assert_still_normal(hostile)
    print(f"fuzz seed {seed}: {fuzz.n} requests in {time.monotonic() - t0:.0f} s, statuses {sorted(statuses.items())}")
    assert fuzz.n >= 1000 and statuses.get(200, 0) > 50  # many reached the engine, not just the schema


# ------------------------------------------------------------------ a generate that overruns its deadline


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_overrun_generate_marks_unhealthy_and_clients_stop_waiting(tiny_model, tmp_path):
    """infer_timeout_s 3 s and a batch that decodes for minutes: the server says it is unhealthy (and
    why), refuses at once instead of queueing, and the client neither retries nor waits."""
    from toolkit.rollout.client import ServerClient, ServerUnavailableError

    srv = start_server(tiny_model, tmp_path, sets=("rollout_matching.vllm.server.infer_timeout_s=3",))
    try:
        r = post(srv, "/infer/", BIG, timeout=120)
        assert r.status_code == 504 and "did not answer generate within 3 s" in r.json()["detail"], r.text
        health = requests.get(srv.url + "/health/", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        assert (
            "did not finish a generate within 3 s" in health.json()["detail"] and "restart" in health.json()["detail"]
        )
        t0 = time.monotonic()
        refused = infer(srv)
        assert refused.status_code == 503 and "unhealthy" in refused.json()["detail"]
        client = ServerClient(srv.url, 0, timeout_s=120, infer_timeout_s=120, backoff_s=30)
        with pytest.raises(ServerUnavailableError) as err:
            client.infer("after-wedge", [[1, 2]], [{"max_tokens": 2}], expect_version=None)
        assert "is unhealthy" in str(err.value) and "did not finish a generate" in str(err.value)
        with pytest.raises(ServerUnavailableError) as err:
            client.wait_healthy(total_timeout_s=120)
        assert "is unhealthy" in str(err.value)
        assert time.monotonic() - t0 < 30  # no 30 s backoff retry, no 120 s health wait
    finally:
        stop(srv.proc)


def test_sigterm_ends_a_busy_server_and_its_worker_within_10_s(tiny_model, tmp_path):
    """A request in flight, its worker decoding for minutes: SIGTERM to the server alone ends both."""
    import signal
    import threading

    srv = start_server(tiny_model, tmp_path)
    try:
        answers = []
        thread = threading.Thread(target=lambda: answers.append(_post_quietly(srv, BIG)), daemon=True)
        thread.start()
        time.sleep(3)  # the batch is decoding
        assert thread.is_alive()
        srv.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        while (srv.proc.poll() is None or group_alive(srv.proc.pid)) and time.monotonic() - t0 < 60:
            time.sleep(0.1)
        took = time.monotonic() - t0
        print(f"SIGTERM → server and worker gone after {took:.1f} s")
        assert srv.proc.poll() is not None and not group_alive(srv.proc.pid), srv.log_tail()
        assert took < 10, f"{took:.1f} s\n{srv.log_tail()}"
        thread.join(10)
        assert answers and answers[0] in (503, "connection closed"), answers  # told, not left hanging
    finally:
        stop(srv.proc)


BIG = {
    "request_id": "big",
    "prompts": [[1, 5 + i % 50, 7 + i % 31] for i in range(128)],
    "sampling": [{"max_tokens": 1000, "temperature": 2.0, "seed": 1}],
}  # ~3 min of decoding on one CPU worker


def _post_quietly(srv, body):
    try:
        return post(srv, "/infer/", body, timeout=300).status_code
    except requests.ConnectionError:
        return "connection closed"
