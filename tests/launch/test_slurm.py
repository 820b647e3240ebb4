"""The sbatch wrappers on a real single-node SLURM (slurmctld + slurmd in a tmp dir, see _slurm_cluster.py).

Skipped with the reason when the SLURM binaries are not installed (scripts/install_slurm.sh installs
them; nothing is installed here). CPU mode (STAGE2_CPU=1), the committed tiny model, short runs.
"""

from __future__ import annotations

import os

import _slurm_cluster
import pytest
from _launch_helpers import ROOT, run_sets, wait_until
from _shared import child_env, metrics

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(_slurm_cluster.available() is not None, reason=str(_slurm_cluster.available())),
]
SCRIPT = "launchers/slurm/stage2_single_node.sbatch"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = _slurm_cluster.LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def job_env() -> dict:
    env = child_env(STAGE2_CPU="1", STAGE2_NPROC="1")
    env["PATH"] = str(ROOT / ".venv" / "bin") + os.pathsep + env["PATH"]  # stage2-launch
    return env


USR1_STEPS = 40


def submit(slurm, tiny, tmp_path, *sets: str) -> tuple[str, str]:
    """sbatch the single-node wrapper in CPU mode; returns (job id, path of its output file)."""
    # --exclusive=user overrides the script's whole-node request: the two jobs of this module share the node.
    job = slurm.sbatch(
        f"--output={tmp_path}/job-%j.out",
        "--time=10",
        "--exclusive=user",
        SCRIPT,
        "smoke/a_only",
        *run_sets(tiny, tmp_path / "run", *sets),
        env=job_env(),
        cwd=ROOT,
    )
    return job, f"{tmp_path}/job-{job}.out"


@pytest.fixture(scope="module")
def jobs(slurm, tiny, tmp_path_factory):
    """Both jobs are submitted at once (each takes one of the node's CPUs): the short run overlaps the
    other's setup and requeue delay, which keeps the module near one minute."""
    short, long = tmp_path_factory.mktemp("short"), tmp_path_factory.mktemp("usr1")
    return {
        "short": (short, *submit(slurm, tiny, short, "training.max_steps=2")),
        # USR1_STEPS leaves the signal, sent at the first metrics line, time to land mid-run on a fast machine.
        "usr1": (long, *submit(slurm, tiny, long, f"training.max_steps={USR1_STEPS}", "training.save_steps=100")),
    }


def test_single_node_sbatch_runs_to_completed(slurm, jobs):
    tmp_path, job, log = jobs["short"]
    info = slurm.wait_state(job, DONE, 240)
    text = open(log).read()
    assert info.get("JobState") == "COMPLETED", (info, text[-3000:])
    assert info.get("ExitCode") == "0:0"
    assert len(metrics(tmp_path / "run")) == 2
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.json").is_file()
    assert "stage2-launch: exit 0 (learner finished)" in text and "restart 0" in text


def test_usr1_checkpoints_requeues_and_the_rerun_resumes(slurm, jobs):
    """USR1 to the batch shell (= `#SBATCH --signal=B:USR1@N` without waiting for the time limit):
    checkpoint → exit 138 → scontrol requeue → rerun with SLURM_RESTART_COUNT=1 → --resume auto → done."""
    tmp_path, job, log = jobs["usr1"]
    out = tmp_path / "run"
    assert wait_until(lambda: metrics(out), 180), open(log).read()[-3000:]
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait_state(job, DONE, 300)
    text = open(log).read()
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", (info, text[-4000:])
    assert "checkpointed on USR1 (exit 138): scontrol requeue" in text
    assert "exit 138 (stopped by signal 10)" in text
    assert f"job {job} restart 1 on" in text  # the rerun saw SLURM_RESTART_COUNT=1
    stopped = sorted(p.name for p in (out / "checkpoints").iterdir())
    last = f"step-{USR1_STEPS:06d}"
    assert stopped[0] != last and stopped[-1] == last, stopped
    assert f"resumed from {out / 'checkpoints' / stopped[0]}" in text
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(
        range(1, USR1_STEPS + 1)
    )  # metrics.jsonl trimmed on resume: each step once
