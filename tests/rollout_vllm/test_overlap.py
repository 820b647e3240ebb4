"""Server-mode overlap: learning on round k while round k+1 decodes changes nothing but the wall time.

`_overlap_worker.py` runs the real trainer (DeepSpeed ZeRO-2, one CPU rank) for two Channel-B steps
against the session's `stage2 serve --dp 2` with `vllm.server.overlap` true, then false: 8 samples per
step in rounds of 2 (decode_batch_size 1 × server world 2), packs of ≤ 512 tokens carried across rounds.
The ChunkStream tests use the real server too, except two that run the FAKE engine of test_app_client.py
behind the real app: a DP worker dying mid-stream (503) cannot be provoked on the shared session server,
and holding a round until the test releases it (to close the stream at a known point) needs its gates.
No test here measures wall time: ordering is pinned by the engine's gates and by joining the producer.
"""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from _shared import child_env, free_port, greedy_settings
from _vllm_helpers import EOS, ROOT
from test_app_client import live as live  # the fixture: the real app over sockets with a toy engine

from toolkit.config.settings import DecodeSettings
from toolkit.rollout import errors
from toolkit.rollout.backends.vllm_server import VLLMServerBackend
from toolkit.rollout.client import ServerClient, ServerUnavailableError

WORKER = Path(__file__).with_name("_overlap_worker.py")
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 100, 200, 300, 400, 500], [1, 42], [1, 7, 7, 7, 7], [1, 3], [1, 11, 12]]
TOL = 1e-6


def settings(dbs: int = 1) -> DecodeSettings:
    return greedy_settings(max_new_tokens=24, decode_batch_size=dbs, seed=7)


@pytest.fixture(scope="module")
def report(server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlap")
    out = tmp / "report.json"
    argv = [
        sys.executable,
        str(WORKER),
        "--out",
        str(out),
        "--tmp",
        str(tmp),
        "--url",
        server.url,
        "--model",
        str(server.model),
    ]
    proc = subprocess.run(argv, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-2000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.vllm
def test_overlap_gives_the_serial_segments_packs_and_update(report):
    a, b = report["overlap"], report["serial"]
    assert len(a["rounds"]) == 8 and [len(r) for r in a["rounds"]] == [2] * 8  # 2 steps × 4 rounds of 2 samples
    assert a["rounds"] == b["rounds"]  # sample ids, token ids and weights of every segment, round by round
    assert a["calls"] == b["calls"]  # the same packs, weights and last flags in every backward_packs call
    assert any(a["carried"]) and a["carried"] == b["carried"]  # some segments waited for a later round's pack
    assert sum(c["last"] for c in a["calls"]) == 2 and len(a["calls"]) == 8  # per step: 4 rounds, the last flushes
    for ma, mb in zip(a["metrics"], b["metrics"]):
        assert ma["loss/total"] == pytest.approx(mb["loss/total"], abs=TOL)
        assert ma["train/grad_norm"] == pytest.approx(mb["train/grad_norm"], abs=TOL)
        assert ma["stage2/segments"] == mb["stage2/segments"] and ma["packing/packs"] == mb["packing/packs"]
    for m in (*a["metrics"], *b["metrics"]):
        # the learner blocked on rollouts for part of the decode wall, never all of it: it trained in between
        assert 0 < m["time/rollout_wait_s"] < m["time/rollout_generate_s"]
    assert report["params_keys_equal"] and report["params_max_abs"] <= TOL
    assert a["moved"] > 5e-5  # the steps trained (lr 1e-4), so equal params mean something


def peel(pack: list[int], segments: list[list[int]]) -> list[list[int]] | None:
    """The segments `pack` concatenates (in some order), or None if it is not a concatenation of them."""
    if not pack:
        return []
    for i, seg in enumerate(segments):
        if seg and pack[: len(seg)] == seg:
            rest = peel(pack[len(seg) :], segments[:i] + segments[i + 1 :])
            if rest is not None:
                return [seg, *rest]
    return None


@pytest.mark.vllm
@pytest.mark.parametrize("mode", ["overlap", "serial"])
def test_each_step_accumulates_every_segment_once_and_steps_at_the_flush(report, mode):
    """Checked directly on the trainer (not only overlap against serial): within a step no optimizer step
    runs and no parameter moves between backward_packs calls; the last round's call (which also packs what
    earlier rounds carried) is the only `last` one; the step's packs hold each of its segments exactly once; the weights
    add up to the step's segments over its raw samples; exactly one optimizer step per trainer step."""
    run = report[mode]
    assert run["optimizer_steps"] == 2
    for step in range(2):
        calls = [c for c in run["calls"] if c["optimizer_steps_before"] == step]
        assert [c["last"] for c in calls] == [False] * (len(calls) - 1) + [True]
        assert all(c["params_unchanged"] for c in calls)
        segments = [seg[1] for rnd in run["rounds"][4 * step : 4 * step + 4] for seg in rnd]
        left = list(segments)
        for pack in (p for c in calls for p in c["packs"]):
            used = peel(pack, left)
            assert used is not None, f"step {step}: a pack is not made of this step's untrained segments"
            for seg in used:
                left.remove(seg)
        assert left == [], f"step {step}: {len(left)} segment(s) never trained (lost at the flush?)"
        m = run["metrics"][step]
        weights = sum(w for c in calls for w in c["weights"])
        assert weights == pytest.approx(m["stage2/segments"] / m["stage2/raw_samples"], abs=1e-12)


@pytest.mark.vllm
def test_trainer_weight_sync_reaches_the_server(report):
    """After training (and a move of the learner's weights that changes its greedy output), the trainer's own
    backend pushes its weights (version STEPS + 1) before decoding: the server reports that version, and its
    greedy rollouts equal an HF copy of the learner's current weights."""
    sync = report["overlap"]["sync"]
    assert sync["greedy"]
    assert sync["server_version"] == 3 and sync["rollout_versions"] == [3]
    assert sync["reference"] != sync["trained"]  # the prompts tell the old weights from the new
    assert sync["served"] == sync["reference"]


@pytest.mark.vllm
def test_producer_thread_calls_no_collective(report):
    assert report["collective_threads"] == ["MainThread"]


@pytest.mark.vllm
def test_chunks_equal_generate_and_sync_runs_on_the_caller(server, hf_model):
    weights = lambda device: ((n, p.detach().to(device)) for n, p in hf_model.named_parameters())  # noqa: E731
    client = ServerClient(server.url, free_port(), timeout_s=30, infer_timeout_s=120)
    backend = VLLMServerBackend([client], settings(), eos_id=EOS, weights=weights, bucket_size_mb=1)
    try:
        backend.connect_weight_sync()
        whole = backend.generate(PROMPTS, step=3)
        stream = backend.generate_chunks(PROMPTS, step=4)
        assert backend.synced_step == 4  # the (collective) sync ran before the producer started
        got = list(stream)
        inline = list(backend.generate_chunks(PROMPTS, step=4, background=False))
    finally:
        backend.close()
    assert [idx for idx, _ in got] == [[0, 1], [2, 3], [4, 5], [6]] == [idx for idx, _ in inline]
    flat = [r.completion_ids for _, ros in got for r in ros]
    assert flat == [r.completion_ids for r in whole] == [r.completion_ids for _, ros in inline for r in ros]
    assert {r.weight_version for _, ros in got for r in ros} == {5}


def producer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "rollout-producer"]


def test_producer_error_surfaces_in_the_consumer_with_the_url(live):
    eng, client = live
    eng.gates = [threading.Event(), threading.Event()]
    eng.gates[0].set()
    backend = VLLMServerBackend([client], settings(dbs=1), eos_id=2)  # rounds of 3 (toy server world 3)
    prompts = [[10 + i, 20 + i] for i in range(9)]
    stream = backend.generate_chunks(prompts, step=0)
    first = next(stream)
    assert first[0] == [0, 1, 2]
    assert [eng.entered.get(timeout=60) for _ in range(2)] == [1, 2]  # round 2 is decoding (held at its gate)
    eng.fail_infer = [errors.Unavailable("dp rank 1 exited with code -9")] * 3  # round 2 and both its retries fail
    eng.gates[1].set()
    with pytest.raises(ServerUnavailableError, match=r"/infer/: HTTP 503: .*dp rank 1 exited with code -9"):
        for _ in stream:
            pass
    assert eng.fail_infer == [] and eng.calls["infer"] == 4  # round 1, round 2 thrice; round 3 never asked
    with pytest.raises(StopIteration):  # the stream is over, not hanging
        next(stream)
    assert not producer_threads()
    backend.close()


def test_closing_early_stops_the_producer(live):
    eng, client = live
    eng.gates = [threading.Event(), threading.Event()]
    eng.gates[0].set()
    backend = VLLMServerBackend([client], settings(dbs=1), eos_id=2)
    stream = backend.generate_chunks([[i, i + 1] for i in range(30)], step=0)
    next(stream)
    assert [eng.entered.get(timeout=60) for _ in range(2)] == [1, 2]  # round 2 is in flight
    stream.close()  # while round 2 is held: the producer cannot exit before it returns
    eng.gates[1].set()
    for thread in producer_threads():
        thread.join(60)
    assert not producer_threads()
    assert eng.calls["infer"] == 2  # no round after the close (of 10)
    backend.close()
