"""Short real runs through the public entry point with the vLLM backends: `python -m toolkit.train
--profile smoke/b_only --set rollout_matching.rollout_backend=vllm …` in colocate mode and in server
mode against the session server. Both exit 0 with rollout metrics, and — same weights, same greedy
decoding — the two modes log the same first-step loss."""

import functools

import pytest
from _shared import free_port, metrics
from _vllm_helpers import run_train

pytestmark = pytest.mark.vllm
run_train = functools.partial(run_train, "smoke/b_only")


def check_run(proc, out) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["channel"] == "B" for r in rows)
    for r in rows:
        assert r["rollout/gen_new_tokens"] > 0 and r["rollout/gen_tokens_per_s"] > 0 and "rollout/f1" in r
    return rows


@pytest.fixture(scope="module")
def colocate_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("colocate_run")
    return check_run(run_train(out, "rollout_matching.vllm.mode=colocate", f"model.model={tiny_model}"), out)


def test_colocate_smoke_run(colocate_run):
    assert len(colocate_run) == 2


def test_server_smoke_run(server, colocate_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("server_run")
    servers = f'rollout_matching.vllm.server.servers=[{{base_url: "{server.url}", group_port: {free_port()}}}]'
    proc = run_train(out, "rollout_matching.vllm.mode=server", servers, f"model.model={server.model}")
    rows = check_run(proc, out)
    assert "weight sync v1" in proc.stderr and "weight sync v2" in proc.stderr
    assert rows[0]["loss/total"] == pytest.approx(colocate_run[0]["loss/total"], rel=1e-5)
