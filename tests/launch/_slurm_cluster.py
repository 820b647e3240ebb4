"""A throw-away SLURM cluster in a tmp dir: one slurmctld and one slurmd per node, all on this machine.

Installs nothing: `available()` says whether slurmctld/slurmd/sbatch are installed (install them with
scripts/install_slurm.sh). The daemons run in the foreground as our children (own sessions), with
their own ports, state and logs under the tmp dir, and auth/none when the plugin exists (no munged);
so a cluster per test session neither needs nor touches a system SLURM.

Two nodes on one machine: each node is a name that already resolves to a loopback address here
(`hostname -s` and `localhost`, see `loopback_names`), with its own slurmd (`slurmd -N NAME`), port,
spool, pid and log (%n in slurm.conf). Jobs, steps, `srun --nodes/--ntasks/-w`, per-task exit codes
and `--kill-on-bad-exit` then behave as on a real two-node cluster; the nodes share the CPUs, memory
and filesystem of this machine (a real cluster's shared filesystem is assumed anyway).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from _shared import free_port

SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")
PLUGIN_DIRS = (
    "/usr/lib/x86_64-linux-gnu/slurm-wlm",
    "/usr/lib/aarch64-linux-gnu/slurm-wlm",
    "/usr/lib64/slurm",
    "/usr/lib/slurm",
)


def available() -> str | None:
    """None when a local cluster can run here, else the reason to skip."""
    missing = [b for b in DAEMONS if shutil.which(b, path=SBIN_PATH) is None]
    if missing:
        return f"SLURM binaries not installed ({', '.join(missing)}); run scripts/install_slurm.sh"
    if os.geteuid() != 0:
        return "slurmd needs root here (SlurmdUser=root)"
    return None


def _auth_lines() -> list[str]:
    if any(Path(d, "auth_none.so").exists() for d in PLUGIN_DIRS):
        return ["AuthType=auth/none", "CredType=cred/none"]
    return ["AuthType=auth/munge", "CredType=cred/munge"]  # needs munged running (scripts/install_slurm.sh)


def _node_line(host: str, port: int | None = None) -> str:
    out = subprocess.run([shutil.which("slurmd", path=SBIN_PATH), "-C"], capture_output=True, text=True).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), f"NodeName={host} CPUs={os.cpu_count()}")
    line = re.sub(r"^NodeName=\S+", f"NodeName={host}", line)
    mem = re.search(r"RealMemory=(\d+)", line)
    if mem:  # leave headroom: memory is not a consumable here anyway
        line = line.replace(mem.group(0), f"RealMemory={int(int(mem.group(1)) * 0.9)}")
    if port is not None:  # several slurmd on one machine: each its own port, reached over loopback
        line += f" NodeAddr=127.0.0.1 Port={port}"
    return line + " State=UNKNOWN"


def loopback_names(count: int) -> list[str] | None:
    """`count` distinct host names that resolve to a 127.x address here (this host first), or None."""
    names = []
    for name in (socket.gethostname().split(".")[0], "localhost"):
        try:
            if socket.gethostbyname(name).startswith("127.") and name not in names:
                names.append(name)
        except OSError:
            pass
    return names[:count] if len(names) >= count else None


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 1, task_plugin: str = "task/none"):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [self.host] if nodes == 1 else loopback_names(nodes)
        if self.nodes is None:
            raise RuntimeError(f"{nodes} nodes need {nodes} host names resolving to 127.x (have: this host, localhost)")
        self.task_plugin = task_plugin
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=SBIN_PATH)
        self.daemons: list[subprocess.Popen] = []

    def job_nodes(self, info: dict) -> list[str]:
        """A job's nodes in SLURM_NODEID order (`scontrol show hostnames` of its NodeList)."""
        return self.run("scontrol", "show", "hostnames", info["NodeList"]).stdout.split()

    @staticmethod
    def cpus_allowed_all() -> str:
        """Cpus_allowed_list of a process bound to every CPU of a node (each node here is the whole machine)."""
        n = os.cpu_count() or 1
        return "0" if n == 1 else f"0-{n - 1}"

    def write_conf(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        lines = [
            "ClusterName=stage2ci",
            f"SlurmctldHost={self.host}",
            "SlurmUser=root",
            "SlurmdUser=root",
            *_auth_lines(),
            "AuthInfo=cred_expire=10",  # requeued jobs become eligible 11 s later (default 121)
            f"SlurmctldPort={free_port()}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            f"TaskPlugin={self.task_plugin}",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=3600",
            *(_node_line(n, free_port()) for n in self.nodes),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 30) -> None:
        self.write_conf()
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        daemons = [("slurmctld", ["-D", "-i"], "slurmctld")] + [
            ("slurmd", ["-D", "-N", n], f"slurmd-{n}") for n in self.nodes
        ]
        for daemon, args, name in daemons:
            log = open(self.root / f"{name}.stdout", "w")
            self.daemons.append(
                subprocess.Popen(
                    [shutil.which(daemon, path=SBIN_PATH), *args],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if state == ["idle"] * len(self.nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"local SLURM did not become idle (sinfo: {state!r}); logs in {self.root}")

    def stop(self) -> None:
        self.run("scancel", "--full", "--user", "root", check=False)  # best effort; jobs die with slurmd anyway
        for proc in reversed(self.daemons):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            except ProcessLookupError:
                pass

    def run(self, *argv: str, check: bool = True, env: dict | None = None, cwd: Path | None = None):
        return subprocess.run(
            [shutil.which(argv[0], path=SBIN_PATH) or argv[0], *argv[1:]],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            cwd=cwd,
            check=check,
            timeout=60,
        )

    def sbatch(self, *argv: str, env: dict, cwd: Path) -> str:
        out = self.run("sbatch", "--parsable", *argv, env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict:
        text = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        return info
