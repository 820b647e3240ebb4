"""TCP ports of one launch: job-derived ports below the ephemeral range, MASTER_PORT, whether a port is free.

The only effects are two socket helpers (`port_is_free`, `probe_free_port`) that bind and close a socket;
callers pass them in, so tests can replace them. launchers/topology.py applies the policy below
(build_topology) and names taken ports (check_ports).
Must never import torch, transformers, deepspeed, vllm or fastapi.

Port policy (every port carries the `source` that chose it, so errors can name it):
  * MASTER_PORT (single node): $MASTER_PORT if set; else derived from $SLURM_JOB_ID (every rerun of
    a job computes the same value, parallel jobs rarely collide); else probed free.
  * job-derived ports lie in [20000, start of the ephemeral range) read from
    /proc/sys/net/ipv4/ip_local_port_range (32768 by default), so an outgoing socket never holds one;
    the sbatch scripts derive the multi-node ones once and hand the same value to every node.
  * rendezvous (multi-node): the port of --rdzv-endpoint HOST:PORT, the same on every node.
  * servers the launcher starts: the profile's base_url port and group_port; under SLURM both are
    derived from $SLURM_JOB_ID instead (two jobs on one node must not share 8000/51216) and the
    learner receives the new list through `--set rollout_matching.vllm.server.servers=[...]`.
A port that this node must bind and that is taken is a PlacementError naming the port and its source.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from toolkit.config.placement import PlacementError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PORT_LO = 20000  # job-derived ports: [PORT_LO, first ephemeral port)
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


@dataclass(frozen=True)
class Port:
    """A TCP port and who chose it (a flag, an env var, a profile key, a SLURM job, a probe)."""

    port: int
    source: str
    bind_here: bool = True  # False: another node binds it (rendezvous on a non-zero node rank)


def ephemeral_start(path: str = EPHEMERAL_RANGE_FILE) -> int:
    """First port of the kernel's ephemeral range (outgoing sockets take ports from it); Linux's
    default 32768 when the file cannot be read (not Linux)."""
    try:
        return int(open(path).read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def job_port_range(first_ephemeral: int | None = None) -> tuple[int, int]:
    """[lo, hi) of job-derived ports: from 20000 (1024 when the ephemeral range starts below 22000)
    up to the first ephemeral port. Raises PlacementError when fewer than 1000 ports remain."""
    hi = ephemeral_start() if first_ephemeral is None else first_ephemeral
    lo = PORT_LO if hi >= PORT_LO + 2000 else 1024
    if hi - lo < 1000:
        raise PlacementError(
            f"{EPHEMERAL_RANGE_FILE} starts at {hi}: too few ports below it for job-derived "
            "ports; set MASTER_PORT / STAGE2_RDZV_PORT / STAGE2_SERVER_PORT explicitly"
        )
    return lo, hi


def job_port(job_id: str, salt: str, first_ephemeral: int | None = None) -> int:
    """A port below the ephemeral range (see job_port_range) that is the same for every rerun of
    SLURM job `job_id` on machines with the same range; `salt` names its use (rdzv, master, ...)."""
    lo, hi = job_port_range(first_ephemeral)
    digest = hashlib.sha256(f"{job_id}:{salt}".encode()).digest()
    return lo + int.from_bytes(digest[:4], "big") % (hi - lo)


def port_is_free(host: str, port: int) -> bool:
    """Whether this machine can bind (host, port) now (SO_REUSEADDR, as servers and TCPStore do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = "" if host in ("0.0.0.0", "::") else host
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind_host, port))
        except OSError:
            return False
    return True


def probe_free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (racy by nature; used only where nothing was configured)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def master_port(env: Mapping[str, str], probe: Callable[[], int]) -> Port:
    """MASTER_PORT for a single-node learner: env var, else SLURM job-derived, else probed free."""
    if env.get("MASTER_PORT"):
        try:
            return Port(int(env["MASTER_PORT"]), "MASTER_PORT environment variable")
        except ValueError:
            raise PlacementError(f"MASTER_PORT={env['MASTER_PORT']!r} is not a port number") from None
    if env.get("SLURM_JOB_ID"):
        return Port(job_port(env["SLURM_JOB_ID"], "master"), f"derived from SLURM_JOB_ID={env['SLURM_JOB_ID']}")
    return Port(probe(), "probed free (set MASTER_PORT to choose)")


def url_host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
