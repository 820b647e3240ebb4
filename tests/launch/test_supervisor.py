"""Supervision with real processes: server readiness faults, a killed learner, a server dying mid-run,
signals before the learner starts. The rollout server is the stand-in (tests/launch/standin_server.py,
started through the real supervisor by tests/launch/_drive.py) because these faults cannot be
provoked on demand with a real server; the learner is the real torchrun + toolkit.train.
Every test checks /proc afterwards: no process of any child group, nothing naming the test's tmp dir.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from _launch_helpers import (DRIVER, child_env, free_port, live_in_group, live_mentioning, rank_pids, started_pids,
                             wait_until)



def drive(spawn, tmp_path, tiny, mode: str, **extra):
    port, group = free_port(), free_port()
    spec = {"profile": "smoke/a_only", "flags": {"gpus": "cpu"}, "standin_mode": mode, "grace": 2.0,
            "sets": ["rollout_matching.rollout_backend=vllm", "rollout_matching.vllm.mode=server",
                     f"rollout_matching.vllm.server.servers=[{{base_url: 'http://127.0.0.1:{port}', group_port: {group}}}]",
                     f"training.output_dir={tmp_path / 'out'}", f"model.model={tiny}", "training.eval_strategy=no"],
            **extra}
    return spawn([sys.executable, DRIVER, json.dumps(spec)], child_env())


def assert_nothing_left(proc, tmp_path):
    """Every child group empty and no process naming tmp_path, read from /proc."""
    groups = started_pids(proc.stderr).values()
    left = wait_until(lambda: not any(live_in_group(g) for g in groups) and not live_mentioning(str(tmp_path)), 15)
    assert left, {g: live_in_group(g) for g in groups} | {"mentioning": live_mentioning(str(tmp_path))}


def test_server_never_healthy_is_an_error_within_the_timeout(spawn, tmp_path, tiny):
    t0 = time.monotonic()
    proc = drive(spawn, tmp_path, tiny, "never_healthy", health_timeout=3)
    assert proc.wait(60) == 1, proc.stderr
    assert time.monotonic() - t0 < 25
    assert "rollout server(s) not healthy within 3 s: server0" in proc.stderr and "HTTP 503" in proc.stderr
    assert "waiting for server0" in proc.stderr or "not healthy" in proc.stderr
    assert "learner" not in started_pids(proc.stderr)
    assert_nothing_left(proc, tmp_path)


def test_wrong_world_size_stops_before_the_learner(spawn, tmp_path, tiny):
    proc = drive(spawn, tmp_path, tiny, "world_size:3")
    assert proc.wait(60) == 1, proc.stderr
    assert "/get_world_size/ says 3, the plan has DP×TP = 1" in proc.stderr
    assert "learner" not in started_pids(proc.stderr)
    assert_nothing_left(proc, tmp_path)


def test_server_exiting_during_startup_names_its_log(spawn, tmp_path, tiny):
    proc = drive(spawn, tmp_path, tiny, "die_after:0")
    assert proc.wait(60) == 1, proc.stderr
    assert "server0 exited with code 3 before becoming healthy; see" in proc.stderr
    assert str(tmp_path / "out" / "logs" / "server0.log") in proc.stderr
    assert_nothing_left(proc, tmp_path)


def test_killed_learner_stops_the_servers_and_exits_nonzero(spawn, tmp_path, tiny):
    """SIGKILL to torchrun's group once the ranks run (in their own sessions: they survive as orphans the
    supervisor must find); the server ignores SIGTERM, so stopping it must escalate to SIGKILL."""
    proc = drive(spawn, tmp_path, tiny, "ignore_term")
    assert proc.wait_for(r"started learner \(pid \d+", 60), proc.stderr
    learner = started_pids(proc.stderr)["learner"]
    ranks = wait_until(lambda: rank_pids(str(tmp_path), learner), 30)
    assert ranks, proc.stderr
    time.sleep(1.5)  # let the supervisor's 1 s scan see the ranks (the subreaper covers the race anyway)
    os.killpg(learner, signal.SIGKILL)
    assert proc.wait(60) == 128 + signal.SIGKILL, proc.stderr
    assert "stopping server0: SIGTERM to process group" in proc.stderr
    assert "still alive 2 s after SIGTERM" in proc.stderr and "SIGKILL" in proc.stderr
    assert "exit 137 (learner exited with code 137)" in proc.stderr
    assert_nothing_left(proc, tmp_path)
    assert not set(ranks) & set(live_mentioning(str(tmp_path)))


def test_server_dying_mid_run_stops_the_learner(spawn, tmp_path, tiny):
    proc = drive(spawn, tmp_path, tiny, "die_after:2")
    code = proc.wait(120)
    assert code != 0, proc.stderr
    assert "server0 died mid-run (code 3); stopping the learner" in proc.stderr
    assert "forwarding signal 15 to the learner's process group" in proc.stderr
    assert "server0 died mid-run after" in proc.stderr or "(server0 died mid-run)" in proc.stderr
    assert_nothing_left(proc, tmp_path)


def test_sigterm_while_waiting_for_servers_stops_them(spawn, tmp_path, tiny):
    proc = drive(spawn, tmp_path, tiny, "never_healthy", health_timeout=120)
    assert proc.wait_for(r"started server0 \(pid \d+", 30), proc.stderr
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143, proc.stderr
    assert "stopped by signal 15 before the learner started" in proc.stderr
    assert_nothing_left(proc, tmp_path)
