"""The multi-node sbatch wrappers on a real SLURM with TWO nodes: one slurmctld and two slurmd daemons on
this machine, the node names `localhost` and this host (both resolve to loopback; see _slurm_cluster.py).

task/affinity is on, so a step that asks for too few CPUs sees it in its Cpus_allowed_list, as on a
cgroup cluster. Most jobs run the stand-in learner (standin_learner.py: records node, CPUs and argv,
then exits with the code the test asks for) because what is tested is SLURM's side: which task runs
where, per-task exit codes, the job's code and the requeue. One job trains for real on both nodes.
Skipped with the reason when SLURM is not installed (scripts/install_slurm.sh) or not root.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import _slurm_cluster
import pytest
from _launch_helpers import PYTHON, ROOT, run_sets, wait_until
from _shared import child_env, metrics

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(_slurm_cluster.available() is not None, reason=str(_slurm_cluster.available())),
]
HERE = Path(__file__).parent
MULTI, SPLIT = "launchers/slurm/stage2_multinode.sbatch", "launchers/slurm/stage2_server_split.sbatch"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if _slurm_cluster.loopback_names(2) is None:
        pytest.skip("two node names resolving to loopback are needed (this host and localhost)")
    cluster = _slurm_cluster.LocalSlurm(tmp_path_factory.mktemp("slurm2"), nodes=2, task_plugin="task/affinity")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def standin_env(tmp_path: Path, plan: str = "", **extra: str) -> dict:
    record = tmp_path / "record"
    record.mkdir(exist_ok=True)
    env = dict(
        STAGE2_CPU="1",
        STAGE2_LAUNCH=f"{PYTHON} {HERE / 'standin_learner.py'}",
        STAGE2_PYTHON=PYTHON,
        STAGE2_STATE_DIR=str(tmp_path / "state"),
        STANDIN_RECORD=str(record),
        STANDIN_PLAN=plan,
        STAGE2_SERVER_LOG=str(tmp_path / "server.log"),
    )
    return child_env(**{**env, **extra})


def submit(slurm, script: str, tmp_path: Path, env: dict, *args: str, options: tuple = ()) -> tuple[str, Path]:
    job = slurm.sbatch(f"--output={tmp_path}/job-%j.out", "--time=10", *options, script, *args, env=env, cwd=ROOT)
    return job, tmp_path / f"job-{job}.out"


def records(tmp_path: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((tmp_path / "record").glob("*.json"))}


def finished(slurm, job: str, log: Path, timeout: float = 240) -> tuple[dict, str]:
    info = slurm.wait_state(job, DONE, timeout)
    return info, log.read_text() if log.exists() else ""


def test_split_steps_get_their_own_nodes_tasks_and_every_cpu(slurm, tmp_path):
    """Server step on node 0 only, learner step on node 1 only, one task each, all the node's CPUs.
    Before the fix both steps inherited SLURM_NTASKS=2 ("More processors requested than permitted")
    and each task was pinned to one CPU."""
    env = standin_env(
        tmp_path, STAGE2_PYTHON=str(HERE / "standin_python.sh"), STANDIN_REAL_PYTHON=PYTHON, STAGE2_HEALTH_TIMEOUT="120"
    )
    job, log = submit(slurm, SPLIT, tmp_path, env, "smoke/b_only", "--set", "x.y=1")
    info, text = finished(slurm, job, log)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (info, text[-3000:])
    (learner,) = records(tmp_path).values()  # exactly one learner task
    first, second = slurm.job_nodes(info)
    assert learner["node"] == second and learner["node_rank"] == "0" and learner["step_tasks"] == "1"
    assert learner["cpus_allowed"] == slurm.cpus_allowed_all() and learner["cpus_per_task"] == str(os.cpu_count())
    server = (tmp_path / "server.log").read_text()
    assert server.count("standin server (ok) on 0.0.0.0") == 1 and "0: standin server" in server, server  # one task
    assert f"http://{first}:" in learner["argv"][learner["argv"].index("--set") + 1]
    assert "servers healthy" in text and "task exit codes: 0 (srun: 0)" in text


def test_a_server_step_that_dies_fails_the_health_wait_at_once(slurm, tmp_path):
    """The REAL server, given a profile that does not exist, exits at once: the job must fail within
    seconds with the server log's tail, not after STAGE2_HEALTH_TIMEOUT (here 900 s)."""
    env = standin_env(tmp_path, STAGE2_HEALTH_TIMEOUT="900")
    job, log = submit(slurm, SPLIT, tmp_path, env, "smoke/no_such_profile")
    info, text = finished(slurm, job, log, timeout=200)
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "1:0", (info, text[-3000:])
    assert "the server step ended before" in text and "no_such_profile" in text.split("the server step ended")[1]
    assert not records(tmp_path)  # no learner started


def test_one_failing_node_makes_the_job_exit_1_not_143(slurm, tmp_path):
    """Node 1 fails with 1, srun TERMs node 0 (143): the job's code is the failing task's, labelled."""
    env = standin_env(tmp_path, "0=wait:138,1=exit:1")
    job, log = submit(slurm, MULTI, tmp_path, env, "smoke/a_only")
    info, text = finished(slurm, job, log)
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "1:0", (info, text[-3000:])
    assert "task exit codes: 143 1" in text and "task 1 failed with code 1" in text
    assert "1: standin learner node rank 1" in text  # srun --label: each line names its task
    assert info.get("Restarts") == "0"


def test_usr1_requeues_only_when_every_node_checkpointed(slurm, tmp_path):
    """USR1 to the batch shell: node 0 says 138 (checkpointed), node 1 says 1 → exit 1, no requeue.
    Then a job where both say 138 → requeued once, and the rerun (restart 1) completes."""
    part = tmp_path / "partial"
    part.mkdir()
    bad, bad_log = submit(slurm, MULTI, part, standin_env(part, "0=wait:138,1=wait:1"), "smoke/a_only")
    full = tmp_path / "full"
    full.mkdir()
    assert wait_until(lambda: len(list((part / "record").glob("*.ready"))) == 2, 120), bad_log.read_text()[-2000:]
    slurm.run("scancel", "--signal=USR1", "--batch", bad)
    info, text = finished(slurm, bad, bad_log)
    assert info.get("ExitCode") == "1:0" and info.get("Restarts") == "0", (info, text[-3000:])
    assert "task exit codes: 138 1" in text

    good, good_log = submit(slurm, MULTI, full, standin_env(full, "0.0=wait:138,0.1=wait:138"), "smoke/a_only")
    assert wait_until(lambda: len(list((full / "record").glob("r0-*.ready"))) == 2, 120), good_log.read_text()[-2000:]
    slurm.run("scancel", "--signal=USR1", "--batch", good)
    info, text = finished(slurm, good, good_log, timeout=300)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", (info, text[-3000:])
    assert "task exit codes: 138 138" in text and "scontrol requeue" in text
    assert {"r0-n0", "r0-n1", "r1-n0", "r1-n1"} <= set(records(full))


def test_usr1_before_the_learners_start_does_not_kill_the_batch_shell(slurm, tmp_path):
    """USR1 during the split script's health wait (the server never becomes healthy here): the trap is
    installed first, so the shell logs it, stops the server step and exits 1 instead of dying."""
    env = standin_env(
        tmp_path,
        STAGE2_PYTHON=str(HERE / "standin_python.sh"),
        STANDIN_REAL_PYTHON=PYTHON,
        STANDIN_MODE="never_healthy",
        STAGE2_HEALTH_TIMEOUT="600",
    )
    job, log = submit(slurm, SPLIT, tmp_path, env, "smoke/b_only")
    assert wait_until(lambda: log.exists() and "server log" in log.read_text(), 120)
    assert wait_until(lambda: (tmp_path / "server.log").exists(), 60)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info, text = finished(slurm, job, log, timeout=120)
    assert info.get("ExitCode") == "1:0", (info, text[-3000:])
    assert "USR1 before the learners started" in text and "USR1 during the health wait: exit 1" in text
    assert not records(tmp_path)


@pytest.mark.slow
def test_real_two_node_training_checkpoints_requeues_and_resumes(slurm, tiny, tmp_path):
    """The REAL stage2-launch and trainer on both nodes (torchrun c10d, one CPU rank each): USR1 to the
    batch shell → both nodes checkpoint (task codes 138 138) → requeue → the rerun resumes → done."""
    out = tmp_path / "run"
    env = child_env(STAGE2_CPU="1", STAGE2_NPROC="1", STAGE2_PYTHON=PYTHON, STAGE2_STATE_DIR=str(tmp_path / "state"))
    env["PATH"] = str(ROOT / ".venv" / "bin") + os.pathsep + env["PATH"]  # stage2-launch
    job, log = submit(
        slurm,
        MULTI,
        tmp_path,
        env,
        "smoke/a_only",
        *run_sets(tiny, out, "training.max_steps=30", "training.save_steps=100"),
    )
    assert wait_until(lambda: metrics(out), 400), log.read_text()[-3000:] if log.exists() else "no output yet"
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info, text = finished(slurm, job, log, timeout=800)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", (info, text[-4000:])
    assert "task exit codes: 138 138" in text and "task exit codes: 0 0" in text
    assert "0: " in text and "1: " in text  # labelled task output
    stopped = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert stopped[0] != "step-000030" and stopped[-1] == "step-000030", stopped
    assert f"resumed from {out / 'checkpoints' / stopped[0]}" in text
    assert [r["step"] for r in metrics(out)] == list(range(30))
    assert (out / "logs" / "learner.log").is_file() and (out / "logs" / "learner-node1.log").is_file()
