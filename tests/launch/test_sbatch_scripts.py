"""The sbatch wrappers' wiring without SLURM: fake `scontrol`/`srun` on PATH, `echo` as stage2-launch.

The fake srun runs the step once per node with that node's SLURM_NODEID, so the test sees exactly what
each node would execute: the node rank must come from the node (escaped inside srun), the rendezvous
HOST:PORT must be the same everywhere (first host, job-derived port), and in the split job the
learners must receive the servers' URLs. The fake ignores task counts, CPUs and node lists: what srun
does with those is tested on a real two-node SLURM in test_slurm_multinode.py (and test_slurm.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from _launch_helpers import ROOT, STANDIN, live_mentioning, wait_until
from _shared import child_env, free_port

from launchers.ports import job_port

FAKE_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' $FAKE_NODES; exit 0; fi
echo "scontrol $*" >> "$FAKE_LOG"
"""
# Options come as --opt=value; the first other word starts the command. A `bash -c` step runs once per
# node with that node's id; any other step (the rollout server) becomes the stand-in server, exec'd so
# that killing "srun" stops it.
FAKE_SRUN = """#!/bin/bash
nodes=1
while [[ "$1" == --* ]]; do [[ "$1" == --nodes=* ]] && nodes=${1#--nodes=}; shift; done
if [ "$1" != bash ]; then
    echo "server step: $*" >> "$FAKE_LOG"
    shift 3  # python -m toolkit.rollout.server
    exec "$FAKE_PYTHON" "$FAKE_STANDIN" "$@" >> "$FAKE_LOG" 2>&1
fi
rc=0
for ((id = 0; id < nodes; id++)); do
    SLURM_NODEID=$id SLURM_PROCID=$id SLURMD_NODENAME=node$id SLURM_STEP_NUM_NODES=$nodes "$@" || rc=$?
done
exit $rc
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "fake.log"
    env = child_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_LOG=str(log),
        FAKE_PYTHON=sys.executable,
        FAKE_STANDIN=STANDIN,
        STAGE2_REPO=str(ROOT),
        STAGE2_PYTHON=sys.executable,
        STAGE2_LAUNCH="echo LAUNCH",
        STAGE2_CPU="1",
        SLURM_JOB_ID="4711",
        SLURM_RESTART_COUNT="0",
        STAGE2_STATE_DIR=str(tmp_path / "state"),
        STAGE2_SERVER_LOG=str(tmp_path / "server.log"),
    )
    return env, log


def run_script(name: str, env: dict, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "launchers" / "slurm" / name), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "name", ["stage2_single_node.sbatch", "stage2_multinode.sbatch", "stage2_server_split.sbatch", "stage2_common.sh"]
)
def test_scripts_parse_and_carry_the_slurm_directives(name):
    path = ROOT / "launchers" / "slurm" / name
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    if name.endswith(".sbatch"):
        text = path.read_text()
        assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text and "--resume auto" in text


def test_single_node_passes_placement_and_resume(fake_slurm):
    env, _ = fake_slurm
    res = run_script("stage2_single_node.sbatch", {**env, "STAGE2_NPROC": "2"}, "smoke/a_only", "--set", "a.b=1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "LAUNCH --profile smoke/a_only --gpus cpu --nproc 2 --resume auto --set a.b=1"
    gpu = {k: v for k, v in env.items() if k != "STAGE2_CPU"}
    res = run_script(
        "stage2_single_node.sbatch",
        {**gpu, "CUDA_VISIBLE_DEVICES": "4,5,6,7", "STAGE2_SERVER_GPUS": "2,3"},
        "prod/ab_mixed",
    )
    assert res.stdout.strip() == "LAUNCH --profile prod/ab_mixed --gpus 0,1 --server-gpus 2,3 --resume auto"


def test_multinode_expands_the_node_rank_on_each_node_and_shares_one_endpoint(fake_slurm):
    env, _ = fake_slurm
    res = run_script(
        "stage2_multinode.sbatch",
        {**env, "FAKE_NODES": "node001 node002", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[001-002]"},
        "prod/ab_mixed",
        "--set",
        "x=1",
    )
    assert res.returncode == 0, res.stderr
    port = job_port("4711", "rdzv")
    assert res.stdout.splitlines() == [
        f"LAUNCH --nnodes 2 --node-rank {rank} --profile prod/ab_mixed --rdzv-endpoint node001:{port} --resume auto "
        "--gpus cpu --nproc 1 --set x=1"
        for rank in (0, 1)
    ]


def test_server_split_starts_servers_first_and_hands_their_urls_to_the_learners(fake_slurm, tmp_path):
    env, log = fake_slurm
    http, group = free_port(), free_port()
    res = run_script(
        "stage2_server_split.sbatch",
        {
            **env,
            "FAKE_NODES": "127.0.0.1 localhost",
            "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "x",
            "STAGE2_SERVER_PORT": str(http),
            "STAGE2_GROUP_PORT": str(group),
            "STAGE2_HEALTH_TIMEOUT": "30",
        },
        "smoke/b_only",
        "--set",
        "training.output_dir=" + str(tmp_path),
        "--launcher",
        "torchrun",
    )
    assert res.returncode == 0, res.stderr
    servers = f"rollout_matching.vllm.server.servers=[{{base_url: 'http://127.0.0.1:{http}', group_port: {group}}}]"
    (line,) = res.stdout.splitlines()  # one learner node
    assert line == (
        f"LAUNCH --nnodes 1 --node-rank 0 --profile smoke/b_only --rdzv-endpoint localhost:{job_port('4711', 'rdzv')} "
        f"--resume auto --set {servers} --gpus cpu --nproc 1 --set training.output_dir={tmp_path} --launcher torchrun"
    )
    step = log.read_text()
    assert re.search(
        rf"server step: \S+ -m toolkit.rollout.server --profile smoke/b_only --gpus cpu --dp 1 --tp 1 "
        rf"--host 0.0.0.0 --port {http} --set {re.escape(servers)} --set training.output_dir=",
        step,
    )
    assert "--launcher" not in step  # only --set options reach the server
    assert "servers healthy" in res.stderr
    assert wait_until(lambda: not live_mentioning(str(tmp_path)), 10)  # the server step was stopped
