"""Fixtures of the launcher tests: a tiny model dir, and spawned processes that are always cleaned up."""
from __future__ import annotations

import os
import signal

import pytest

from _launch_helpers import Proc, live_mentioning, tiny_model_dir


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def spawn(tmp_path):
    """spawn(argv, env) → Proc; at teardown every spawned group and any process naming tmp_path is killed."""
    procs: list[Proc] = []

    def start(argv, env, **kw) -> Proc:
        proc = Proc(argv, env, **kw)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill_group()
    for pid in live_mentioning(str(tmp_path)):  # strays that left their group (should be none)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
