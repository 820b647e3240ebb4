"""Run a test worker script on 1 rank (plain process) or W ranks (torchrun) and read rank 0's JSON report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _shared import child_env, free_port

ROOT = Path(__file__).resolve().parents[2]


def run_worker(worker: Path, args: list[str], world: int, tmp: Path, timeout_s: int, label: str) -> dict:
    """Run `worker` (its own process group, killed whole on timeout); `args` get `--out/--tmp` prepended."""
    out = tmp / "report.json"
    argv = [str(worker), "--out", str(out), "--tmp", str(tmp), *args]
    if world > 1:
        argv = ["-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(free_port()), *argv]
    log_path = tmp / "worker.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=ROOT,
            env=child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    tail = log_path.read_text()[-6000:]
    assert rc == 0 and out.exists(), f"{label} worker (world {world}) failed: rc={rc}\n{tail}"
    report = json.loads(out.read_text())
    report["job_s"] = round(time.time() - t0, 1)
    return report


# ---- the worker side (imported by the worker scripts, which run from this folder) ----------------------------
def worker_parser(default_stages: str):
    """argparse for a worker: `--out/--tmp` (what `run_worker` passes) and `--stages`."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tmp", required=True)
    parser.add_argument("--stages", default=default_stages, help="comma list of ZeRO stages (3o: ZeRO-3 offload)")
    return parser


def write_report(report: dict, out: str, rank: int) -> None:
    """Rank 0 writes the JSON report atomically (a killed worker never leaves half a report)."""
    if rank == 0:
        with open(out + ".tmp", "w") as fh:
            json.dump(report, fh, indent=1, default=str)
        os.replace(out + ".tmp", out)
