"""Helpers for end-to-end tests: real `python -m toolkit.train` / torchrun subprocesses on CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from _shared import child_env, free_port

ROOT = Path(__file__).resolve().parents[2]

# Short runs: tiny decode budget, small eval; every test overrides output_dir.
FAST = (
    "rollout_matching.max_new_tokens=48",
    "data.val_sample_limit=4",
    "training.logging_steps=1",
)


def train_argv(profile: str, out: Path, *sets: str) -> list[str]:
    argv = ["-m", "toolkit.train", "--profile", profile, "--set", f"training.output_dir={out}"]  # tb: <out>/tb
    for s in (*FAST, *sets):
        argv += ["--set", s]
    return argv


def run_train(
    profile: str, out: Path, *sets: str, resume: str | None = None, timeout: int = 600, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    argv = [sys.executable, *train_argv(profile, out, *sets)] + (["--resume", resume] if resume else []) + list(flags)
    return subprocess.run(argv, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)


def run_torchrun(
    nproc: int, profile: str, out: Path, *sets: str, resume: str | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *train_argv(profile, out, *sets),
    ]  # torchrun's own -m: run a module
    argv += ["--resume", resume] if resume else []
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, "")
