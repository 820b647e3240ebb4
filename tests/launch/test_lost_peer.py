"""A hung peer on a two-node launch (two stage2-launch processes on localhost, c10d rendezvous, one CPU
rank each): node 1's rank is frozen with SIGSTOP mid-run. Node 0's rank must fail after
training.collective_timeout_s (set to 20 s here; torch's gloo default would wait 30 min), report the
lost peer with the rank → host table, skip the exit barrier (a second wait for the frozen peer), and
its launch must exit non-zero. Real trainer, real gloo; nothing is faked."""

from __future__ import annotations

import os
import signal

import pytest
from _launch_helpers import rank_pids, started_pids, two_node_launch, wait_until
from _shared import child_env, free_port, metrics

pytestmark = pytest.mark.e2e


def _ppid(pid: int) -> int | None:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def test_a_frozen_peer_fails_the_other_node_after_the_collective_timeout(spawn, tmp_path, tiny):
    out, port = tmp_path / "out", free_port()
    sets = ("training.max_steps=200", "training.save_strategy=no", "training.collective_timeout_s=20")
    node0 = spawn(two_node_launch("smoke/a_only", tiny, out, port, 0, *sets), child_env())
    assert node0.wait_for(r"started learner", 120), node0.stderr
    node1 = spawn(two_node_launch("smoke/a_only", tiny, out, port, 1, *sets), child_env())
    assert wait_until(lambda: len(metrics(out)) >= 1, 300), node0.stderr[-4000:]
    learner1 = wait_until(lambda: started_pids(node1.stderr).get("learner"), 30)  # node 1's torchrun
    frozen = [pid for pid in rank_pids(str(tmp_path), learner1) if _ppid(pid) == learner1]  # its rank only
    assert len(frozen) == 1, node1.stderr[-2000:]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        code = node0.wait(300)
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    log = (out / "logs" / "learner.log").read_text()
    assert code != 0, node0.stderr[-4000:]
    assert "lost a learner peer: a collective failed on rank" in log, log[-4000:]
    assert "training.collective_timeout_s=20 s" in log and "rank 0 on" in log and "rank 1 on" in log
    # No exit barrier on the error path: it would time out a second time, during the cleanup.
    assert log.count("During handling of the above exception") == 0, log[-4000:]
