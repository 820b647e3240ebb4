"""The learner process group: join torchrun's (or make a one-process gloo group), close it, and name a lost
peer when a collective fails. Imports torch; `deepspeed` inside functions only.
"""

from __future__ import annotations

import dataclasses
import os

import torch


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str


def _prepare_deepspeed() -> None:
    """Environment DeepSpeed needs on CPU, set before its first engine start."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # shm_comm is only for inference all-reduce, yet every engine start JIT-builds it (~75 s, needs g++).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0  # = training.collective_timeout_s's default
PEER_HOSTS: list[str] = []  # host name of every rank, gathered once at init (names a lost peer)
# Texts of torch.distributed / gloo / NCCL errors that mean a peer is gone or hung.
PEER_FAILURE_MARKERS = (
    "timed out",
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "watchdog caught collective operation timeout",
    "communicator was aborted",
)


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Join the torchrun process group, or make a one-process gloo group without ports. Idempotent.

    timeout_s: the longest a collective waits for its peers (training.collective_timeout_s); explicit,
    because torch's own default differs per backend (NCCL 10 min) and a hung peer must fail the others.
    """
    import datetime
    import socket

    import torch.distributed as dist

    _prepare_deepspeed()
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            import deepspeed

            timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_COLLECTIVE_TIMEOUT_S)
            # DeepSpeed builds its data-parallel groups with new_group(), which takes torch's default
            # timeout (gloo 30 min, NCCL 10 min), not the world group's: make ours the default too.
            from torch.distributed import distributed_c10d

            distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
            PEER_HOSTS[:] = [""] * dist.get_world_size()
            dist.all_gather_object(PEER_HOSTS, socket.gethostname())
        else:
            # A process group is required even for one process, or deepspeed.initialize tries MPI discovery.
            os.environ.setdefault("LOCAL_RANK", "0")
            dist.init_process_group(
                backend,
                store=dist.HashStore(),
                rank=0,
                world_size=1,
                device_id=torch.device("cuda", local_rank) if cuda else None,
            )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def close_distributed(barrier: bool = True) -> None:
    """Barrier + destroy: two-rank gloo jobs can abort at exit when the group is never destroyed.
    barrier=False on the error path: a collective there would wait for the peer that is gone."""
    import torch.distributed as dist

    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def describe_peer_failure(exc: BaseException, timeout_s: float) -> str | None:
    """A sentence for a collective that failed because a peer is lost or hung, naming its node where
    the error or the rank table allows; None when `exc` is not such a failure."""
    import socket

    import torch.distributed as dist

    text = str(exc)
    if not PEER_HOSTS or not any(m in text.lower() for m in PEER_FAILURE_MARKERS):
        return None
    rank = dist.get_rank() if dist.is_initialized() else -1
    me = socket.gethostname()
    others = {h for r, h in enumerate(PEER_HOSTS) if r != rank}
    table = ", ".join(f"rank {r} on {h}" for r, h in enumerate(PEER_HOSTS))
    if len(others) == 1:
        peer = f"the peer node is {next(iter(others))}"
    else:
        peer = f"a peer on one of {', '.join(sorted(others))}"
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    return (
        f"lost a learner peer: a collective failed on rank {rank} ({me}): {first}. {peer.capitalize()} "
        f"({table}); see that node's learner log. Collectives wait at most "
        f"training.collective_timeout_s={timeout_s:g} s for a peer."
    )
