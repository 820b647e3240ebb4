"""What the terminal shows during `stage2 train` (toolkit/trainer/console.py): a real run inside tmux.

tmux is the terminal emulator (160×50): the test reads the screen it renders (`capture-pane`), not the
raw byte stream, so a bar re-printed under every log line or a timestamp glued to the bar's tail shows
up exactly as a person would see it.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from _e2e_runs import ROOT, run_train, train_argv
from _shared import child_env

SETS = ("training.max_steps=3", "training.eval_steps=3", "training.save_steps=3", "training.logging_steps=1")
BAR = re.compile(r"stage2: +\d+%\|")
STEP = re.compile(r"toolkit.trainer.loop: step \d+/\d+ ")
LOG = re.compile(r"^\d\d:\d\d:\d\d \[rank0\] (INFO|WARNING|ERROR) ")


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_screen_has_one_bar_at_the_bottom_and_log_lines_above_it(tmp_path):
    out = tmp_path / "run"
    done = tmp_path / "exit_code"
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, *train_argv("smoke/a_only", out, *SETS)])
    exports = " ".join(
        f"{k}={shlex.quote(v)}"
        for k, v in child_env().items()
        if k in ("PYTHONPATH", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR")
    )
    session = f"stage2-test-{tmp_path.name}"[:60]
    _tmux(
        "new-session",
        "-d",
        "-s",
        session,
        "-x",
        "160",
        "-y",
        "50",
        "-c",
        str(ROOT),
        f"env {exports} {cmd}; echo $? > {done}; sleep 600",
    )
    try:
        deadline = time.monotonic() + 900
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(2)
        screen = _tmux("capture-pane", "-p", "-t", session, "-S", "-500").rstrip("\n").splitlines()
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    text = "\n".join(screen)
    assert done.read_text().strip() == "0", text[-3000:]
    lines = [line for line in screen if line.strip()]
    bars = [i for i, line in enumerate(lines) if BAR.search(line)]
    assert len(bars) == 1, text  # one bar, never re-printed under each log line
    assert "100%|" in lines[bars[0]] and "3/3" in lines[bars[0]]
    after = lines[bars[0] + 1 :]
    assert all(LOG.match(line) for line in after), text  # only log lines written after the bar closed
    step_lines = [line for line in lines if STEP.search(line) and LOG.match(line)]
    assert len(step_lines) == 3, text  # logging_steps=1: one line per step, each on its own screen line
    assert any("checkpoint written" in line for line in lines), text
    assert not any(re.search(r"\d\d:\d\d:\d\d \[rank0\]", line) and not LOG.match(line) for line in lines), text
    assert "Writing model shards" not in text  # third-party bars are off while the step bar is up


@pytest.mark.slow
def test_without_a_terminal_there_is_no_bar_only_plain_lines(tmp_path):
    proc = run_train(
        "smoke/a_only", tmp_path / "run", "training.max_steps=2", "training.eval_steps=2", "training.save_steps=2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr and not BAR.search(proc.stderr), proc.stderr[-3000:]
    assert "Writing model shards" not in proc.stderr
    assert sum(1 for line in proc.stderr.splitlines() if STEP.search(line) and LOG.match(line)) == 2
