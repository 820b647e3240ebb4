"""The weight-sync process group between the learner and the rollout server's workers.

A `TCPStore` + `ProcessGroupGloo` (CPU) or `ProcessGroupNCCL` (GPU) built WITHOUT touching the
default process group (the learner's torchrun group and the server's vLLM group stay untouched). The
server's rank 0 hosts the store on `group_port`, bound to the address the HTTP server binds (a
socket we bind and hand to torch: torch's own store would listen on every interface); the learner
joins as the last rank and broadcasts. What travels through it (specs, buckets) is `weight_sync.py`.
torch is imported inside functions only, so the app and the client import this module cheaply.
"""

from __future__ import annotations

import datetime
import errno
import os
import socket

from toolkit.rollout.errors import BadRequest, Conflict, EngineError

LEARNER_READY_KEY = "stage2_learner_ready"


def listen_fd(host: str, port: int, group_port: int) -> int:
    """A listening TCP socket on exactly (host, port), as a file descriptor torch's store takes over."""
    host = "127.0.0.1" if host == "localhost" else host
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise EngineError(f"cannot resolve the weight-sync bind address {host!r}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of a closed group only
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise Conflict(
                f"weight-sync group_port {group_port} is already in use on the server host "
                "(fix: give this server another rollout_matching.vllm.server.servers[].group_port, "
                "or stop the process holding it)"
            ) from None
        raise EngineError(f"could not bind the weight-sync store at {host}:{port}: {exc.strerror or exc}") from None
    return sock.detach()  # torch owns it now and closes it with the store


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class SyncGroup:
    """One weight-sync process group (learner = last rank), independent of any default process group."""

    def __init__(self, host: str, port: int, world_size: int, rank: int, backend: str, timeout_s: float):
        self.host, self.port, self.world_size, self.rank = host, port, world_size, rank
        self.backend = backend
        self.timeout = datetime.timedelta(seconds=float(timeout_s))
        self.store = None
        self.pg = None

    def open_store(self, is_master: bool, bind_host: str | None = None) -> None:
        """Bind (master, on `bind_host`, default `host`) or reach the rendezvous store. Fails fast, naming
        the port, when it is taken."""
        import torch.distributed as dist

        fd = listen_fd(bind_host or self.host, self.port, self.port) if is_master else None
        try:
            self.store = dist.TCPStore(
                self.host,
                self.port,
                self.world_size,
                is_master=is_master,
                wait_for_workers=False,
                timeout=self.timeout,
                master_listen_fd=fd,
            )
        except Exception as exc:  # DistNetworkError / RuntimeError, depending on the failure
            if fd is not None:
                _close_fd(fd)
            text = str(exc)
            if is_master and ("EADDRINUSE" in text or "address already in use" in text.lower()):
                raise Conflict(
                    f"weight-sync group_port {self.port} is already in use on the server host "
                    "(fix: give this server another rollout_matching.vllm.server.servers[].group_port, "
                    "or stop the process holding it)"
                ) from None
            role = "bind" if is_master else "reach"
            raise EngineError(
                f"could not {role} the weight-sync store at {self.host}:{self.port} within "
                f"{self.timeout.total_seconds():g} s: {text.splitlines()[0] if text else type(exc).__name__}"
            ) from None

    def join(self) -> None:
        """Build the process group (blocks until every rank, the learner included, has joined). The learner
        first announces itself in the store, so server ranks wait for it without blocking (peer_ready)."""
        import torch
        import torch.distributed as dist

        if self.rank == self.world_size - 1:
            self.store.set(LEARNER_READY_KEY, "1")
        store = dist.PrefixStore("stage2_weight_sync", self.store)
        if self.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, self.rank, self.world_size, self.timeout)
        elif self.backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            self.pg = dist.ProcessGroupNCCL(store, self.rank, self.world_size, opts)
            # NCCL connects lazily: one tiny broadcast makes join() mean "connected" on every rank.
            probe = torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()))
            self.broadcast(probe, src=self.world_size - 1)
        else:
            raise BadRequest(f"weight-sync backend must be gloo or nccl, got {self.backend!r}")

    def peer_ready(self) -> bool:
        """True once the learner (the last rank) has started its join; never blocks."""
        if self.store is None:
            raise EngineError("weight-sync store is not open (fix: POST /init_communicator/ first)")
        return bool(self.store.check([LEARNER_READY_KEY]))

    def broadcast(self, tensor, src: int) -> None:
        self.wait(self.broadcast_async(tensor, src))

    def broadcast_async(self, tensor, src: int):
        """Start a broadcast and return its work handle (finish it with `wait`)."""
        import torch.distributed as dist

        if self.pg is None:
            raise EngineError("weight-sync group is not initialized (fix: POST /init_communicator/ first)")
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        return self.pg.broadcast([tensor], opts)

    def wait(self, work) -> None:
        work.wait()
        if self.backend == "nccl":
            import torch

            torch.cuda.synchronize()

    def close(self) -> None:
        pg, self.pg, self.store = self.pg, None, None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:  # a peer may be gone already; closing must not fail
                pass
