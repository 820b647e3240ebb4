"""The one place that spawns and kills processes: rollout servers and the learner, each in its own group.

Flow of `Supervisor.run(plan)`: start every server (own session/process group, output to
`<logs>/serverN.log`) → wait for `GET /health/` of all of them (bounded, a progress line to stderr)
→ check `/get_world_size/` against the planned DP×TP and the plan's other checks → start the learner
(torchrun / deepspeed runner, own group, output teed to `<logs>/learner.log` and to stderr) → watch.

Signals: SIGINT/SIGTERM/SIGUSR1 received by the launcher are forwarded to the learner's process group
(the trainer finishes its step, checkpoints, exits 128+N); a second stop signal kills everything now.
Any exit path (done, error, Ctrl-C, a child crash, a server dying mid-run) ends with every child group
terminated: SIGTERM, wait `grace`, SIGKILL, each step logged; membership is read from /proc, so
grandchildren (ranks) count too. The exit code is the learner's (see `_exit_code` for the torchrun case).
Must never import torch, transformers, deepspeed, vllm or fastapi.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TextIO

from launchers import probe

log = logging.getLogger("stage2.launch")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
POLL_S = 0.2


class LaunchError(RuntimeError):
    """The launch failed before or around the learner (a server never healthy, a check failed, ...)."""


@dataclass
class ProcessSpec:
    """One child: what to run, with which environment, where its output goes."""

    name: str
    argv: list[str]
    env: dict
    log_path: Path
    tee: bool = False  # also copy output to the console (stderr)
    ignore_usr1: bool = False  # launcher wrappers ignore SIGUSR1; the ranks install their own handler


@dataclass
class ServerSpec:
    """A rollout server to start and the checks it must pass before the learner starts."""

    process: ProcessSpec
    base_url: str
    world_size: int  # planned DP × TP
    verify: Callable[[str], list[str]] = lambda url: []  # further checks (model, max_model_len)


@dataclass
class Plan:
    servers: list[ServerSpec]
    learner: ProcessSpec
    health_timeout: float = 600.0
    checkpointed_since: Callable[[float], Path | None] = lambda t: None  # newest checkpoint written after t


@dataclass
class Outcome:
    exit_code: int
    wall_s: float
    reason: str
    logs: list[Path] = field(default_factory=list)


@dataclass
class Child:
    spec: ProcessSpec
    proc: subprocess.Popen
    log_file: TextIO
    tee_thread: threading.Thread | None = None

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the child leads its own group


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is `pgid`, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _child_setup(ignore_usr1: bool) -> Callable[[], None]:
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: nothing to load in the child
    except (OSError, AttributeError):
        prctl = None

    def setup() -> None:  # runs in the child between fork and exec
        if ignore_usr1:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if prctl is not None:  # if the launcher is SIGKILLed, its direct children still get SIGTERM
            prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    return setup


def normalize_code(returncode: int | None) -> int:
    """Popen's -N (killed by signal N) → 128+N, as a shell reports it."""
    if returncode is None:
        return 1
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Starts, watches and stops the children of one launch. Use `run(plan)` once."""

    def __init__(self, grace: float = 10.0, stop_timeout: float = 600.0, console: TextIO | None = None):
        self.grace, self.stop_timeout = grace, stop_timeout
        self.console = console or sys.stderr
        self.children: list[Child] = []
        self.signals: list[int] = []
        self.stop_forwarded: tuple[int, float] | None = None  # (signal, time)

    # ------------------------------------------------------------------ spawning / killing
    def start(self, spec: ProcessSpec) -> Child:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(spec.log_path, "a", buffering=1)
        log_file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} stage2-launch starts {spec.name}: "
                       f"{' '.join(spec.argv)}\n")
        out = subprocess.PIPE if spec.tee else log_file
        proc = subprocess.Popen(spec.argv, env=spec.env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_child_setup(spec.ignore_usr1))
        child = Child(spec, proc, log_file)
        if spec.tee:
            child.tee_thread = threading.Thread(target=self._tee, args=(proc.stdout, log_file), daemon=True)
            child.tee_thread.start()
        self.children.append(child)
        log.info("started %s (pid %d, own process group), log %s", spec.name, proc.pid, spec.log_path)
        return child

    def _tee(self, pipe, log_file: TextIO) -> None:
        for raw in iter(pipe.readline, b""):  # drains until every process holding the pipe has exited
            line = raw.decode(errors="replace")
            log_file.write(line)
            try:
                self.console.write(line)
                self.console.flush()
            except (OSError, ValueError):
                pass
        pipe.close()

    def signal_group(self, child: Child, signum: int) -> None:
        try:
            os.killpg(child.pgid, signum)
        except ProcessLookupError:
            pass

    def wait_group(self, child: Child, timeout: float) -> bool:
        """Wait until no live process is left in the child's group; True if it emptied in time."""
        deadline = time.monotonic() + timeout
        while True:
            child.proc.poll()  # reap the leader so it does not linger as a zombie member
            if not group_members(child.pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)

    def terminate(self, child: Child, grace: float | None = None) -> None:
        """SIGTERM the whole group, wait `grace`, SIGKILL what is left; every step logged."""
        grace = self.grace if grace is None else grace
        name = child.spec.name
        if group_members(child.pgid):
            log.info("stopping %s: SIGTERM to process group %d", name, child.pgid)
            self.signal_group(child, signal.SIGTERM)
            if not self.wait_group(child, grace):
                left = group_members(child.pgid)
                log.warning("%s: %d process(es) still alive %.0f s after SIGTERM %s: SIGKILL", name, len(left),
                            grace, left)
                self.signal_group(child, signal.SIGKILL)
                if not self.wait_group(child, 10.0):
                    log.error("%s: processes %s survived SIGKILL", name, group_members(child.pgid))
        child.proc.poll()
        self._close(child)

    def _close(self, child: Child) -> None:
        if child.tee_thread is not None:
            child.tee_thread.join(timeout=5.0)
        child.log_file.close() if not child.log_file.closed else None

    def terminate_all(self) -> None:
        """Stop every child group, the learner first (it may still talk to the servers)."""
        for child in sorted(self.children, key=lambda c: c.spec.name != "learner"):
            try:
                self.terminate(child)
            except Exception:  # keep going: the other groups must still be stopped
                log.exception("while stopping %s", child.spec.name)

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, _frame) -> None:
        self.signals.append(signum)

    def _install_handlers(self) -> dict:
        return {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    # ------------------------------------------------------------------ the run
    def run(self, plan: Plan) -> Outcome:
        """Start servers, wait until ready, run the learner to its end; always stop every child."""
        t0 = time.monotonic()
        previous = self._install_handlers()
        try:
            servers = [self.start(s.process) for s in plan.servers]
            self._await_servers(plan, servers)
            learner = self.start(plan.learner)
            code, reason = self._watch(plan, learner, servers)
        except LaunchError as exc:
            code, reason = 1, str(exc)
            log.error("%s", exc)
        except _Interrupted as exc:
            code, reason = 128 + exc.signum, f"stopped by signal {exc.signum} before the learner started"
        finally:
            self.terminate_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return Outcome(code, time.monotonic() - t0, reason, [c.spec.log_path for c in self.children])

    def _check_interrupt(self) -> None:
        if self.signals:
            raise _Interrupted(self.signals[0])

    def _await_servers(self, plan: Plan, servers: list[Child]) -> None:
        specs = {c.spec.name: s for c, s in zip(servers, plan.servers)}
        pending = list(servers)
        t0 = last_note = time.monotonic()
        details = {c.spec.name: "not probed yet" for c in servers}
        while pending:
            self._check_interrupt()
            for child in list(pending):
                if child.proc.poll() is not None:
                    raise LaunchError(f"{child.spec.name} exited with code {normalize_code(child.proc.returncode)} "
                                      f"before becoming healthy; see {child.spec.log_path}{_tail(child.spec.log_path)}")
                ok, details[child.spec.name] = probe.health(specs[child.spec.name].base_url)
                if ok:
                    pending.remove(child)
                    log.info("%s healthy at %s after %.1f s", child.spec.name, specs[child.spec.name].base_url,
                             time.monotonic() - t0)
            waited = time.monotonic() - t0
            if pending and waited > plan.health_timeout:
                names = ", ".join(f"{c.spec.name} {specs[c.spec.name].base_url}/health/ ({details[c.spec.name]}; "
                                  f"log {c.spec.log_path})" for c in pending)
                raise LaunchError(f"rollout server(s) not healthy within {plan.health_timeout:g} s: {names}"
                                  f"{_tail(pending[0].spec.log_path)}")
            if pending and time.monotonic() - last_note >= 5.0:
                last_note = time.monotonic()
                log.info("waiting for %s: %.0f s / %g s (%s)", ", ".join(c.spec.name for c in pending), waited,
                         plan.health_timeout, "; ".join(details[c.spec.name] for c in pending))
            if pending:
                time.sleep(0.5)
        for child in servers:
            self._verify(specs[child.spec.name])

    def _verify(self, spec: ServerSpec) -> None:
        try:
            size = probe.world_size(spec.base_url)
            problems = [] if size == spec.world_size else [
                f"{spec.base_url}: /get_world_size/ says {size}, the plan has DP×TP = {spec.world_size}"]
            problems += spec.verify(spec.base_url)
        except probe.ProbeError as exc:
            problems = [str(exc)]
        if problems:
            raise LaunchError(f"{spec.process.name} failed its checks: " + "; ".join(problems))
        log.info("%s: world size %d as planned", spec.process.name, size)

    def _watch(self, plan: Plan, learner: Child, servers: list[Child]) -> tuple[int, str]:
        server_died, killed = None, False
        while learner.proc.poll() is None:
            if self.signals:
                self._handle_signals(learner)
            for child in servers:
                if server_died is None and child.proc.poll() is not None:
                    server_died = child
                    log.error("%s died mid-run (code %d); stopping the learner. See %s", child.spec.name,
                              normalize_code(child.proc.returncode), child.spec.log_path)
                    self._forward(learner, signal.SIGTERM)
            if self.stop_forwarded and not killed and time.time() - self.stop_forwarded[1] > self.stop_timeout:
                log.error("the learner did not stop within %.0f s of signal %d: SIGKILL", self.stop_timeout,
                          self.stop_forwarded[0])
                self.signal_group(learner, signal.SIGKILL)
                killed = True
            time.sleep(POLL_S)
        wrapper = normalize_code(learner.proc.returncode)
        if self.stop_forwarded and not self.wait_group(learner, self.stop_timeout):
            log.warning("learner ranks still running %.0f s after the stop signal", self.stop_timeout)
        code = self._exit_code(plan, wrapper)
        if server_died is not None:
            return code or 1, f"{server_died.spec.name} died mid-run"
        if self.stop_forwarded:
            return code, f"stopped by signal {self.stop_forwarded[0]}"
        return code, "learner finished" if code == 0 else f"learner exited with code {code}"

    def _handle_signals(self, learner: Child) -> None:
        signum = self.signals.pop(0)
        if self.stop_forwarded is None:
            self._forward(learner, signum)
            return
        log.warning("second stop signal (%d): killing every process group now", signum)
        for child in self.children:
            self.signal_group(child, signal.SIGKILL)

    def _forward(self, learner: Child, signum: int) -> None:
        if self.stop_forwarded is None:
            self.stop_forwarded = (signum, time.time())
        log.warning("forwarding signal %d to the learner's process group %d: the ranks finish the current step, "
                    "checkpoint and exit (up to %.0f s; a second Ctrl-C kills)", signum, learner.pgid,
                    self.stop_timeout)
        self.signal_group(learner, signum)

    def _exit_code(self, plan: Plan, wrapper: int) -> int:
        """The learner's code. torchrun exits 1 after it forwarded a stop signal even though every rank
        checkpointed and exited 128+N; a checkpoint written after the forward is the ranks' answer."""
        if not self.stop_forwarded or wrapper == 0:
            return wrapper
        signum, since = self.stop_forwarded
        ckpt = plan.checkpointed_since(since)
        if ckpt is not None:
            log.info("the learner checkpointed %s after signal %d", ckpt, signum)
            return 128 + signum
        return wrapper


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n  last lines of the log:\n    " + "\n    ".join(text) if text else ""
