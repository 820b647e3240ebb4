"""The one place that spawns and kills processes: rollout servers and the learner, each in its own group.

Flow of `Supervisor.run(plan)`: start every server (own session/process group, output to
`<logs>/serverN.log`) → wait for `GET /health/` of all of them (bounded, a progress line to stderr)
→ check `/get_world_size/` against the planned DP×TP and the plan's other checks → start the learner
(torchrun / deepspeed runner, own group, output to `<logs>/learner.log`, copied to stderr) → watch.

Signals: SIGINT/SIGTERM/SIGUSR1 received by the launcher are forwarded to the learner's process groups
(the trainer finishes its step, checkpoints, exits 128+N); a second stop signal kills everything now.
Any exit path (done, error, Ctrl-C, a child crash, a server dying mid-run) ends with every child group
terminated: SIGTERM, wait `grace`, SIGKILL, each step logged. A child's groups are all the groups seen
in its process tree (torchrun puts each rank in its own session, see launchers/proctree.py), read
from /proc; the launcher is a child subreaper, so orphans of a killed torchrun are adopted and stopped.
The exit code is the learner's (see `_exit_code` for the torchrun case). Log files: launchers/childlog.py;
the plan it runs: launchers/plan.py.
Must never import torch, transformers, deepspeed, vllm or fastapi.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from launchers import childlog, probe, proctree
from launchers.plan import Outcome, Plan, ProcessSpec, ServerSpec

log = logging.getLogger("stage2.launch")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
POLL_S = 0.2


class LaunchError(RuntimeError):
    """The launch failed before or around the learner (a server never healthy, a check failed, ...)."""


@dataclass
class Child:
    spec: ProcessSpec
    proc: subprocess.Popen
    log_file: TextIO
    tee_thread: threading.Thread | None = None
    tee_done: threading.Event = field(default_factory=threading.Event)
    groups: set[int] = field(default_factory=set)  # every live process group seen in this child's tree

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the child leads its own group


def _child_setup(ignore_usr1: bool) -> Callable[[], None]:
    deathsig = proctree.pdeathsig_setter(signal.SIGTERM)  # launcher SIGKILLed → direct children get SIGTERM

    def setup() -> None:  # runs in the child between fork and exec
        if ignore_usr1:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        deathsig()

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
        self.adopted: set[int] = set()  # groups of orphans re-parented to us (we are a child subreaper)
        self._preexisting: set[int] = set()

    # ------------------------------------------------------------------ spawning / tracking
    def start(self, spec: ProcessSpec) -> Child:
        log_file, offset = childlog.open_log(spec.log_path, f"stage2-launch starts {spec.name}: {' '.join(spec.argv)}")
        # The child writes to the log file itself, never to a pipe of ours: if the launcher dies, the
        # ranks keep a valid stdout (a broken pipe would crash one rank mid-step and hang the others).
        proc = subprocess.Popen(
            spec.argv,
            env=spec.env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_child_setup(spec.ignore_usr1),
        )
        child = Child(spec, proc, log_file, groups={proc.pid})
        if spec.tee:
            child.tee_thread = threading.Thread(
                target=childlog.follow, daemon=True, args=(spec.log_path, offset, child.tee_done, self.console)
            )
            child.tee_thread.start()
        self.children.append(child)
        log.info("started %s (pid %d, own process group), log %s", spec.name, proc.pid, spec.log_path)
        return child

    def refresh(self) -> dict:
        """Record the live process groups under every child (ranks run in their own sessions) and
        adopt orphans; reap adopted zombies. Returns the /proc table it read."""
        table = proctree.scan()
        me, tracked = os.getpid(), {c.proc.pid for c in self.children}
        for child in self.children:
            child.groups |= {table[p].pgrp for p in proctree.descendants(table, child.proc.pid)}
        for pid, info in table.items():
            if info.ppid != me or pid in tracked or pid in self._preexisting:
                continue
            if info.state == "Z":
                _reap(pid)
            else:
                self.adopted |= {info.pgrp} | {table[p].pgrp for p in proctree.descendants(table, pid)}
        live = {info.pgrp for info in table.values() if info.state != "Z"}
        for child in self.children:  # an empty group is gone for good; never signal a reused id
            child.groups &= live
        self.adopted &= live
        return table

    def live(self, groups: set[int]) -> list[int]:
        return proctree.live_in_groups(groups, self.refresh()) if groups else []

    def signal_groups(self, groups: set[int], signum: int) -> None:
        for pgid in sorted(groups):
            try:
                os.killpg(pgid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def wait_child(self, child: Child, timeout: float) -> bool:
        """Wait until no live process is left in the child's groups; True if they emptied in time."""
        deadline = time.monotonic() + timeout
        while True:
            child.proc.poll()  # reap the leader so it does not linger as a zombie
            if not self.live(child.groups):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)

    def terminate(self, child: Child, grace: float | None = None) -> None:
        """SIGTERM every group of the child, wait `grace`, SIGKILL what is left; every step logged."""
        grace = self.grace if grace is None else grace
        name = child.spec.name
        if self.live(child.groups):
            log.info("stopping %s: SIGTERM to process group(s) %s", name, sorted(child.groups))
            self.signal_groups(child.groups, signal.SIGTERM)
            if not self.wait_child(child, grace):
                left = self.live(child.groups)
                log.warning(
                    "%s: %d process(es) still alive %.0f s after SIGTERM %s: SIGKILL", name, len(left), grace, left
                )
                self.signal_groups(child.groups, signal.SIGKILL)
                if not self.wait_child(child, 10.0):
                    log.error("%s: processes %s survived SIGKILL", name, self.live(child.groups))
        child.proc.poll()
        child.tee_done.set()
        if child.tee_thread is not None:
            child.tee_thread.join(timeout=5.0)
        if not child.log_file.closed:
            child.log_file.close()

    def terminate_all(self) -> None:
        """Stop every child (the learner first: it may still talk to the servers), then adopted orphans."""
        for child in sorted(self.children, key=lambda c: c.spec.name != "learner"):
            try:
                self.terminate(child)
            except Exception:  # keep going: the other groups must still be stopped
                log.exception("while stopping %s", child.spec.name)
        if self.live(self.adopted):
            log.warning("orphaned processes %s: SIGTERM", self.live(self.adopted))
            self.signal_groups(self.adopted, signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            while self.live(self.adopted) and time.monotonic() < deadline:
                time.sleep(POLL_S)
            if self.live(self.adopted):
                log.warning("orphaned processes %s: SIGKILL", self.live(self.adopted))
                self.signal_groups(self.adopted, signal.SIGKILL)
        self.refresh()  # reap what we adopted

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
        self._preexisting = {pid for pid, info in proctree.scan().items() if info.ppid == os.getpid()}
        subreaper = proctree.set_subreaper(True)
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
            if subreaper:
                proctree.set_subreaper(False)
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
        log.info(  # at once: the servers' start-up (model load, engine) takes a while before the first note
            "waiting up to %g s (--health-timeout) for %s",
            plan.health_timeout,
            ", ".join(f"{c.spec.name} {specs[c.spec.name].base_url}/health/" for c in servers),
        )
        while pending:
            self._check_interrupt()
            for child in list(pending):
                if child.proc.poll() is not None:
                    code, path = normalize_code(child.proc.returncode), child.spec.log_path
                    raise LaunchError(
                        f"{child.spec.name} exited with code {code} before becoming healthy; "
                        f"see {path}{childlog.tail(path)}"
                    )
                ok, details[child.spec.name] = probe.health(specs[child.spec.name].base_url)
                if ok:
                    pending.remove(child)
                    log.info(
                        "%s healthy at %s after %.1f s",
                        child.spec.name,
                        specs[child.spec.name].base_url,
                        time.monotonic() - t0,
                    )
            waited = time.monotonic() - t0
            if pending and waited > plan.health_timeout:
                names = ", ".join(
                    f"{c.spec.name} {specs[c.spec.name].base_url}/health/ ({details[c.spec.name]}; "
                    f"log {c.spec.log_path})"
                    for c in pending
                )
                raise LaunchError(
                    f"rollout server(s) not healthy within {plan.health_timeout:g} s: {names}"
                    f"{childlog.tail(pending[0].spec.log_path)}"
                )
            if pending and time.monotonic() - last_note >= 5.0:
                last_note = time.monotonic()
                log.info(
                    "waiting for %s: %.0f s / %g s (%s)",
                    ", ".join(c.spec.name for c in pending),
                    waited,
                    plan.health_timeout,
                    "; ".join(details[c.spec.name] for c in pending),
                )
            if pending:
                time.sleep(0.5)
        for child in servers:
            self._verify(specs[child.spec.name])

    def _verify(self, spec: ServerSpec) -> None:
        try:
            size = probe.world_size(spec.base_url)
            problems = (
                []
                if size == spec.world_size
                else [f"{spec.base_url}: /get_world_size/ says {size}, the plan has DP×TP = {spec.world_size}"]
            )
            problems += spec.verify(spec.base_url)
        except probe.ProbeError as exc:
            problems = [str(exc)]
        if problems:
            raise LaunchError(f"{spec.process.name} failed its checks: " + "; ".join(problems))
        log.info("%s: world size %d as planned", spec.process.name, size)

    def _watch(self, plan: Plan, learner: Child, servers: list[Child]) -> tuple[int, str]:
        server_died, killed, scanned = None, False, 0.0
        while learner.proc.poll() is None:
            if time.monotonic() - scanned > 1.0:  # learn the ranks' groups (a /proc scan costs a few ms)
                self.refresh()
                scanned = time.monotonic()
            if self.signals:
                self._handle_signals(learner)
            for child in servers:
                if server_died is None and child.proc.poll() is not None:
                    server_died = child
                    log.error(
                        "%s died mid-run (code %d); stopping the learner. See %s",
                        child.spec.name,
                        normalize_code(child.proc.returncode),
                        child.spec.log_path,
                    )
                    self._forward(learner, signal.SIGTERM)
            if self.stop_forwarded and not killed and time.time() - self.stop_forwarded[1] > self.stop_timeout:
                log.error(
                    "the learner did not stop within %.0f s of signal %d: SIGKILL",
                    self.stop_timeout,
                    self.stop_forwarded[0],
                )
                self.signal_groups(learner.groups, signal.SIGKILL)
                killed = True
            time.sleep(POLL_S)
        wrapper = normalize_code(learner.proc.returncode)
        if self.stop_forwarded and not self.wait_child(learner, self.stop_timeout):
            log.warning("learner ranks still running %.0f s after the stop signal", self.stop_timeout)
        code = self._exit_code(plan, wrapper)
        if server_died is not None:
            return code or 1, f"{server_died.spec.name} died mid-run"
        if self.stop_forwarded:
            done = "" if code == 128 + self.stop_forwarded[0] else ", no checkpoint written"
            return code, f"stopped by signal {self.stop_forwarded[0]}{done}"
        return code, "learner finished" if code == 0 else f"learner exited with code {code}"

    def _handle_signals(self, learner: Child) -> None:
        signum = self.signals.pop(0)
        if self.stop_forwarded is None:
            self._forward(learner, signum)
            return
        log.warning("second stop signal (%d): killing every process group now", signum)
        for child in self.children:
            self.signal_groups(child.groups, signal.SIGKILL)

    def _forward(self, learner: Child, signum: int) -> None:
        if self.stop_forwarded is None:
            self.stop_forwarded = (signum, time.time())
        self.refresh()  # the ranks' own groups (torchrun gives each rank a session) get it too
        log.warning(
            "forwarding signal %d to the learner's process groups %s: the ranks finish the current step, "
            "checkpoint and exit (up to %.0f s; a second Ctrl-C kills)",
            signum,
            sorted(learner.groups),
            self.stop_timeout,
        )
        self.signal_groups(learner.groups, signum)

    def _exit_code(self, plan: Plan, wrapper: int) -> int:
        """The learner's code. torchrun exits 1 after it forwarded a stop signal even though every rank
        checkpointed and exited 128+N; a checkpoint written after the forward is the ranks' answer.
        128+N means exactly that: stopped AND checkpointed. Stopped without a new checkpoint is 1 (a
        SIGTERMed torchrun would say 143, which the SLURM wrappers would take for a checkpoint)."""
        if not self.stop_forwarded or wrapper == 0:
            return wrapper
        signum, since = self.stop_forwarded
        ckpt = plan.checkpointed_since(since)
        if ckpt is not None:
            log.info("the learner checkpointed %s after signal %d", ckpt, signum)
            return 128 + signum
        log.error(
            "the learner stopped after signal %d without writing a checkpoint (its code %d): exit 1", signum, wrapper
        )
        return 1


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
