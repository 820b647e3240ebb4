"""Cluster-path checks that need no SLURM: loopback server URLs refused on multi-node launches (at
preflight, --dry-run included), and the launcher's 128+N meaning "stopped AND checkpointed"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _launch_helpers import LAUNCH, ROOT
from _shared import child_env

from launchers.plan import Plan, ProcessSpec
from launchers.supervisor import Supervisor
from toolkit.preflight import PreflightError, check_multinode_servers

SERVER_MODE = ("--set", "rollout_matching.rollout_backend=vllm", "--set", "rollout_matching.vllm.mode=server")


def dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *LAUNCH,
            "--profile",
            "smoke/b_only",
            *SERVER_MODE,
            "--set",
            f"training.output_dir={tmp_path}",
            "--gpus",
            "cpu",
            "--dry-run",
            *args,
        ],
        env=child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_loopback_servers_are_refused_on_a_multi_node_launch(tmp_path):
    res = dry_run(tmp_path, "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node001:29500")
    assert res.returncode != 0, res.stdout
    assert "rollout_matching.vllm.server.servers: http://127.0.0.1:8000 is a loopback address" in res.stderr
    assert "launchers/slurm/stage2_server_split.sbatch" in res.stderr and "Traceback" not in res.stderr
    ok = dry_run(
        tmp_path,
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--rdzv-endpoint",
        "node001:29500",
        "--set",
        "rollout_matching.vllm.server.servers=[{base_url: 'http://node009:8000', group_port: 51216}]",
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert dry_run(tmp_path).returncode == 0  # one node: the launcher starts the loopback server itself


@pytest.mark.parametrize("url", ["http://localhost:8000", "http://127.0.0.2:8000", "http://[::1]:8000"])
def test_every_loopback_spelling_is_refused(url):
    with pytest.raises(PreflightError, match="loopback"):
        check_multinode_servers({"server_base_urls": [url]}, 2)
    check_multinode_servers({"server_base_urls": [url]}, 1)


def _stop_after_start(sup: Supervisor) -> None:
    while not any(c.spec.name == "learner" for c in sup.children):
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)  # the supervisor's handler forwards it to the learner


@pytest.mark.parametrize("checkpointed", [False, True])
def test_stopped_learner_exits_128_plus_n_only_after_a_checkpoint(tmp_path, checkpointed):
    """A real learner process killed by the forwarded SIGTERM: 143 only when a checkpoint was written
    after the signal, else 1 (the SLURM wrappers read 128+N as "checkpointed")."""
    learner = ProcessSpec(
        "learner", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), tmp_path / "learner.log"
    )
    plan = Plan([], learner, checkpointed_since=lambda t: tmp_path if checkpointed else None)
    sup = Supervisor(grace=2.0, stop_timeout=30.0)
    threading.Thread(target=_stop_after_start, args=(sup,), daemon=True).start()
    outcome = sup.run(plan)
    if checkpointed:
        assert (outcome.exit_code, outcome.reason) == (143, "stopped by signal 15")
    else:
        assert (outcome.exit_code, outcome.reason) == (1, "stopped by signal 15, no checkpoint written")


def test_a_peer_failure_names_the_other_node_and_other_errors_are_left_alone(monkeypatch):
    from toolkit.trainer import distributed

    monkeypatch.setattr(distributed, "PEER_HOSTS", ["node001", "node002"])
    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation")
    text = distributed.describe_peer_failure(timeout, 20)
    assert "lost a learner peer" in text and "(rank 0 on node001, rank 1 on node002)" in text
    assert "training.collective_timeout_s=20 s" in text
    assert distributed.describe_peer_failure(RuntimeError("CUDA out of memory"), 20) is None
    assert distributed.describe_peer_failure(ValueError("bad record"), 20) is None
