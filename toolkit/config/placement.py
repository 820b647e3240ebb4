"""Placement: where a run's processes go, parsed once from the placement flags into one frozen value.

`Placement.from_flags(gpus=..., nproc=..., server_gpus=..., ...)` reads the flags of `stage2 preflight` and
`stage2-launch` (`--gpus 0,1` or `--gpus cpu [--nproc N]`, `--server-gpus`, `--server-dp/--server-tp`,
`--nnodes/--node-rank/--rdzv-endpoint`) and checks what they say about each other; toolkit/preflight.py
builds the launcher contract from it and launchers/topology.py plans ports and servers from it.
`parse_gpu_list` is the one GPU-list parser (`stage2 serve --gpus` uses it too). Stdlib only.

    >>> p = Placement.from_flags(gpus="0,1", server_gpus="2,3")
    >>> p.learner_gpus, p.nproc_per_node, p.world_size, p.server_gpus, p.cpu
    ((0, 1), 2, 2, (2, 3), False)
    >>> Placement.from_flags(gpus="cpu", nproc=3, nnodes=2, rdzv_endpoint="node001:29500").world_size
    6
"""

from __future__ import annotations

from dataclasses import dataclass

CPU = "cpu"


class PlacementError(ValueError):
    """A placement flag is invalid or inconsistent, or a port is taken; the message names the flag or port."""


class GpuListError(PlacementError):
    """A GPU list that is not comma-separated distinct ids ≥ 0 or `cpu` (a usage error)."""


def parse_gpu_list(text: str | None, flag: str) -> tuple[int, ...] | str | None:
    """`"0,1"` → (0, 1); `"cpu"` → "cpu"; None → None. Raises GpuListError naming the flag."""
    if text is None:
        return None
    if text.strip().lower() == CPU:
        return CPU
    try:
        ids = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise GpuListError(f"{flag} {text!r}: expected comma-separated GPU ids (e.g. 0,1) or 'cpu'") from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise GpuListError(f"{flag} {text!r}: expected distinct GPU ids ≥ 0 (e.g. 0,1)")
    return ids


def split_endpoint(text: str, flag: str = "--rdzv-endpoint") -> tuple[str, int]:
    """`host:port` → (host, port); raises PlacementError naming the flag."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PlacementError(f"{flag} {text!r}: expected HOST:PORT (e.g. node001:29500)")
    return host, int(port)


def ids_text(ids) -> str:
    """(0, 1) → "0,1", as the ids are written on the command line."""
    return ",".join(map(str, ids))


@dataclass(frozen=True)
class Placement:
    """The learner's GPUs (None: CPU ranks) and ranks per node, the nodes, and the rollout servers' GPUs.

    Build it with `from_flags`, which checks the flags against each other; the fields are then consistent.
    """

    learner_gpus: tuple[int, ...] | None = None  # the --gpus ids as given (None: --gpus cpu)
    nproc_per_node: int = 1
    server_gpus: tuple[int, ...] | None = None  # --server-gpus (None: not given)
    server_dp: int | None = None
    server_tp: int | None = None
    nnodes: int = 1
    node_rank: int = 0
    rdzv: tuple[str, int] | None = None  # --rdzv-endpoint as (host, port)

    @property
    def cpu(self) -> bool:
        return self.learner_gpus is None

    @property
    def world_size(self) -> int:
        """Learner world size W over all nodes (the W of gradient accumulation)."""
        return self.nnodes * self.nproc_per_node

    @property
    def rdzv_endpoint(self) -> str | None:
        return f"{self.rdzv[0]}:{self.rdzv[1]}" if self.rdzv else None

    @classmethod
    def from_flags(
        cls,
        gpus: str | None = None,
        nproc: int | None = None,
        server_gpus: str | None = None,
        server_dp: int | None = None,
        server_tp: int | None = None,
        nnodes: int = 1,
        node_rank: int = 0,
        rdzv_endpoint: str | None = None,
    ) -> Placement:
        """Parse and cross-check the placement flags. Raises PlacementError (GpuListError) naming the flag."""
        rdzv = _node_flags(nnodes, node_rank, rdzv_endpoint)
        learner = parse_gpu_list(gpus, "--gpus")
        if nproc is not None and nproc < 1:
            raise PlacementError(f"--nproc must be ≥ 1, got {nproc}")
        if isinstance(learner, tuple) and nproc is not None and nproc != len(learner):
            raise PlacementError(
                f"--nproc {nproc} disagrees with --gpus {ids_text(learner)} ({len(learner)} ids); "
                "drop --nproc (one rank per GPU) or use --gpus cpu"
            )
        servers = parse_gpu_list(server_gpus, "--server-gpus")
        if servers == CPU:
            raise PlacementError("--server-gpus takes GPU ids (e.g. 2,3), not 'cpu'; CPU servers start with --gpus cpu")
        learner = learner if isinstance(learner, tuple) else None
        overlap = sorted(set(servers or ()) & set(learner or ()))
        if overlap:
            raise PlacementError(
                f"--gpus {ids_text(learner)} and --server-gpus {ids_text(servers)} must be disjoint; "
                f"both hold GPU {ids_text(overlap)}"
            )
        per_node = len(learner) if learner else nproc or 1
        return cls(learner, per_node, servers, server_dp, server_tp, nnodes, node_rank, rdzv)


def _node_flags(nnodes: int, node_rank: int, rdzv_endpoint: str | None) -> tuple[str, int] | None:
    if nnodes < 1:
        raise PlacementError(f"--nnodes must be ≥ 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise PlacementError(f"--node-rank {node_rank} is outside 0..{nnodes - 1} (--nnodes {nnodes})")
    if nnodes > 1 and not rdzv_endpoint:
        raise PlacementError(
            f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node; "
            "HOST = the first node, e.g. $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1))"
        )
    return split_endpoint(rdzv_endpoint) if rdzv_endpoint else None
