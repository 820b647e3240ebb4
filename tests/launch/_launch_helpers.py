"""Helpers for the launcher tests: real subprocesses in their own groups, drained pipes, /proc checks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
LAUNCH = [PYTHON, "-c", "from launchers.cli import launch_main; launch_main()"]  # = the stage2-launch script
STANDIN = str(Path(__file__).with_name("standin_server.py"))
DRIVER = str(Path(__file__).with_name("_drive.py"))

# Short real runs (as tests/e2e): tiny decode budget, small eval, one log line per step.
FAST = (
    "rollout_matching.max_new_tokens=48",
    "data.val_sample_limit=4",
    "training.logging_steps=1",
    "training.eval_strategy=no",
)


def run_sets(model: Path, out: Path, *extra: str) -> list[str]:
    """--set arguments for a short CPU run writing under `out`."""
    argv = []
    for item in (
        f"model.model={model}",
        f"training.output_dir={out}",
        f"training.logging_dir={out / 'tb'}",
        *FAST,
        *extra,
    ):
        argv += ["--set", item]
    return argv


def cpu_launch(profile: str, model: Path, out: Path, *sets: str, nproc: int = 2, flags: tuple = ()) -> list[str]:
    """`stage2-launch` argv of a short CPU run of `profile` (`nproc` ranks, more launcher `flags`) under `out`."""
    return [*LAUNCH, "--profile", profile, "--gpus", "cpu", "--nproc", str(nproc), *flags, *run_sets(model, out, *sets)]


def two_node_launch(profile: str, model: Path, out: Path, rdzv_port: int, node_rank: int, *sets: str) -> list[str]:
    """Node `node_rank` of a simulated two-node CPU launch on localhost: one rank each, c10d on `rdzv_port`."""
    flags = ("--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{rdzv_port}", "--node-rank", str(node_rank))
    return cpu_launch(profile, model, out, *sets, nproc=1, flags=flags)


# ----------------------------------------------------------------------------- /proc
def _stat_fields(pid: str) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def live_in_group(pgid: int) -> list[int]:
    """Non-zombie pids whose process group is pgid (read from /proc, not assumed)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        f = _stat_fields(pid)
        if f and f[0] != "Z" and int(f[2]) == pgid:
            out.append(int(pid))
    return out


def live_mentioning(marker: str) -> list[int]:
    """Non-zombie pids whose command line contains `marker` (a test's unique tmp path)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        f = _stat_fields(pid)
        if marker in cmd and f and f[0] != "Z" and int(pid) != os.getpid():
            out.append(int(pid))
    return out


def rank_pids(marker: str, launcher_pgid: int) -> list[int]:
    """Live learner ranks (toolkit.train, not torchrun) naming `marker` outside the launcher wrapper's group:
    torchrun starts every rank in its own session."""
    out = []
    for pid in live_mentioning(marker):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "toolkit.train" in cmd and "toolkit.torchrun" not in cmd and pid not in live_in_group(launcher_pgid):
            out.append(pid)
    return out


def _cmdline(pid) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _start_time(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a live pid, or None: the pair names a process
    even after its pid is reused."""
    f = _stat_fields(str(pid))
    return (f[0], int(f[19])) if f and len(f) > 19 else None


class TreeWatch:
    """Every process that descends from `root`, recorded by polling /proc from a thread while the test runs.

    Command-line markers miss processes that do not name the test's paths (vLLM's engine and data-parallel
    workers), and parent links break once a process dies (its children are re-parented), so the tree is
    followed live: a process joins when its parent is the root or any process already recorded, and stays
    recorded (pid + start time) after it is orphaned. `alive()` lists the recorded ones still running.
    Processes born and gone between two polls (0.2 s) are missed; they are gone anyway.
    """

    def __init__(self, root: int):
        self.root = root
        self.seen: dict[int, int] = {}  # pid -> start time
        self.cmdlines: dict[int, str] = {}  # pid -> command line when first seen
        self._stop = threading.Event()
        self._poll()
        self._thread = threading.Thread(target=self._run, name="tree-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._poll()

    def _poll(self) -> None:
        parents = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            f = _stat_fields(pid)
            if f and len(f) > 19:
                parents[int(pid)] = (int(f[1]), int(f[19]))
        grew = True
        while grew:  # a whole new chain (child of a child) joins in one poll
            grew = False
            for pid, (ppid, start) in parents.items():
                if pid not in self.seen and (ppid == self.root or ppid in self.seen):
                    self.seen[pid] = start
                    self.cmdlines[pid] = _cmdline(pid)
                    grew = True

    def alive(self) -> list[int]:
        """Recorded descendants still running (not zombies), the same processes (start time checked)."""
        out = []
        for pid, start in self.seen.items():
            now = _start_time(pid)
            if now and now[0] != "Z" and now[1] == start:
                out.append(pid)
        return sorted(out)

    def describe(self, pids) -> dict[int, str]:
        return {pid: self.cmdlines.get(pid, "")[:200] for pid in pids}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def wait_until(predicate, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


# ----------------------------------------------------------------------------- processes
class Proc:
    """A subprocess in its own session whose stdout/stderr are drained by threads (no pipe can fill)."""

    def __init__(self, argv: list[str], env: dict, cwd: Path = ROOT):
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._drain, args=(s, buf), daemon=True)
            for s, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for t in self._threads:
            t.start()
        self.tree = TreeWatch(self.proc.pid)  # every descendant, for the orphan checks and the cleanup

    def left_behind(self, timeout: float) -> list[int]:
        """Descendants still running after `timeout` s of waiting for them to go ([] = none left)."""
        wait_until(lambda: not self.tree.alive(), timeout)
        return self.tree.alive()

    @staticmethod
    def _drain(stream, buf: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            buf.append(raw.decode(errors="replace"))
        stream.close()

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, pattern: str, timeout: float) -> re.Match | None:
        """The first stderr match of `pattern`, waiting up to `timeout` (None if the process ended first)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = rx.search(self.stderr)
            if m or self.proc.poll() is not None:
                return m or rx.search(self.stderr)
            time.sleep(0.1)
        return None

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return code

    def kill_group(self) -> None:
        """Teardown: SIGKILL the group and every recorded descendant still running."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in self.tree.alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.tree.stop()
        try:
            self.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def started_pids(stderr: str) -> dict[str, int]:
    """{child name: pid} from the supervisor's 'started NAME (pid N, own process group)' lines."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"started (\S+) \(pid (\d+), own process group\)", stderr)}
