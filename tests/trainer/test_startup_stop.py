"""A stop signal during start-up ends `python -m toolkit.train` at once (issue 15, item 7): before the first
step there is nothing to checkpoint, and start-up can wait for minutes (hub retries, data, servers).

The wait is made real and deterministic with a FIFO as `data.train_jsonl`: the trainer blocks reading it
inside setup, after the stop handlers of the old code were installed (they only set a flag, so it never
returned).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _shared import child_env

REPO = Path(__file__).resolve().parents[2]


def _open_writer_when_read(fifo: Path, proc: subprocess.Popen, log: Path) -> int:
    """A non-blocking write open succeeds only once a reader has the FIFO open: the trainer is in setup."""
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        assert proc.poll() is None, f"trainer ended before reading its data:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def _start(tmp_path: Path):
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    log = tmp_path / "stderr.txt"
    env = child_env()
    cmd = [
        sys.executable,
        "-m",
        "toolkit.train",
        "--profile",
        "smoke/a_only",
        "--set",
        f"data.train_jsonl={fifo}",
        "--set",
        f"training.output_dir={tmp_path / 'out'}",
        "--set",
        f"training.logging_dir={tmp_path / 'tb'}",
        "--set",
        "data.val_sample_limit=2",
        "--set",
        "data.train_sample_limit=16",
    ]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    return proc, fifo, log


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_during_startup_stops_the_process(tmp_path, sig):
    proc, fifo, log = _start(tmp_path)
    writer = None
    try:
        writer = _open_writer_when_read(fifo, proc, log)  # the trainer now blocks in read(): no data yet
        proc.send_signal(sig)
        code = proc.wait(timeout=120)  # a hang guard, not a timing claim: without the fix it never returns
    finally:
        if writer is not None:
            os.close(writer)
        _stop(proc)
    text = log.read_text()
    assert code == 128 + sig, text[-3000:]
    assert "during start-up" in text and "Traceback" not in text, text[-3000:]
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_sigusr1_during_startup_checkpoints_after_the_first_step(tmp_path):
    """SLURM's USR1 warning is not lost in start-up: the run still trains one step, checkpoints, exits 138."""
    proc, fifo, log = _start(tmp_path)
    writer = None
    try:
        writer = _open_writer_when_read(fifo, proc, log)
        proc.send_signal(signal.SIGUSR1)
        try:
            with open(fifo, "wb") as data:  # a reader is there, so this open does not block
                data.write((REPO / "assets" / "data" / "train.jsonl").read_bytes())
        except BrokenPipeError:
            pass  # the reader stops at train_sample_limit and closes its end
        os.close(writer)
        writer = None
        code = proc.wait(timeout=600)
    finally:
        if writer is not None:
            os.close(writer)
        _stop(proc)
    text = log.read_text()
    assert code == 128 + signal.SIGUSR1, text[-3000:]
    assert (tmp_path / "out" / "checkpoints" / "step-000001" / "trainer_state.json").is_file(), text[-3000:]
