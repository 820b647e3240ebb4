"""`stage2 serve` / `python -m toolkit.rollout.server` user errors: exit 1 with a message, before any engine starts."""

import socket
import subprocess
import sys

from _shared import child_env
from _vllm_helpers import ROOT


def serve(*args: str) -> subprocess.CompletedProcess:
    env = child_env()
    env.pop("STAGE2_SERVE_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "toolkit.rollout.server", "--profile", "smoke/b_only", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_non_loopback_needs_a_token():
    proc = serve("--host", "0.0.0.0")
    assert proc.returncode == 1 and "STAGE2_SERVE_TOKEN" in proc.stderr and "0.0.0.0" in proc.stderr


def test_taken_http_port_fails_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = serve("--port", str(port), "--set", "rollout_matching.rollout_backend=vllm")
    assert proc.returncode == 1 and f"cannot bind 127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr


def test_gpu_count_must_match_dp_tp():
    proc = serve("--gpus", "0,1,2", "--dp", "2", "--tp", "1")
    assert proc.returncode == 1 and "--dp 2 × --tp 1 = 2" in proc.stderr
    assert serve("--tp", "2").returncode == 1


def test_help_lists_the_launcher_flags():
    out = serve("--help").stdout
    for flag in ("--profile", "--gpus", "--dp", "--tp", "--host", "--port", "--set"):
        assert flag in out
