"""Placement of one launch: learner GPUs/ranks, nodes, rendezvous, rollout servers and their ports.

Owns the `Topology` dataclass and the pure functions that build it from the launch's `Placement`
(toolkit/config/placement.py: the flags, parsed once) plus an explicit environment mapping (SLURM_JOB_ID,
MASTER_PORT, CUDA_VISIBLE_DEVICES); nothing here reads os.environ or spawns anything. Ports and the
port policy: launchers/ports.py.
Must never import torch, transformers, deepspeed, vllm or fastapi.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from launchers.ports import LOOPBACK, Port, job_port, master_port, port_is_free, probe_free_port, url_host_port
from toolkit.config.placement import CPU, Placement, PlacementError, ids_text


@dataclass(frozen=True)
class ServerPlan:
    """One rollout server the launcher starts: devices, parallelism, endpoint."""

    index: int
    host: str
    http: Port
    group: Port
    gpus: tuple[int, ...] | str  # physical/visible ids for CUDA_VISIBLE_DEVICES, or "cpu"
    dp: int
    tp: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.http.port}"

    @property
    def world_size(self) -> int:
        return self.dp * self.tp


@dataclass(frozen=True)
class Topology:
    """Where every process of one launch runs. `learner_gpus` is None on CPU."""

    learner_gpus: tuple[int, ...] | None
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: Port | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str = "stage2"
    servers: tuple[ServerPlan, ...] = ()
    external_servers: tuple[str, ...] = ()  # server-mode URLs this launch does not start
    external_world_size: int | None = None  # --server-dp × TP expected of each of them (None: any)
    server_mode: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def cpu(self) -> bool:
        return self.learner_gpus is None

    @property
    def world_size(self) -> int:
        """Learner world size W over all nodes (the W of gradient accumulation)."""
        return self.nnodes * self.nproc_per_node

    def to_dict(self) -> dict:
        """Plain data for --dry-run output."""
        return {
            "learner": {
                "gpus": CPU if self.cpu else list(self.learner_gpus),
                "nproc_per_node": self.nproc_per_node,
                "nnodes": self.nnodes,
                "node_rank": self.node_rank,
                "world_size": self.world_size,
            },
            "rendezvous": (
                {"endpoint": self.rdzv_endpoint, "id": self.rdzv_id}
                if self.rdzv_endpoint
                else {"master_addr": self.master_addr, "master_port": _port_dict(self.master_port)}
            ),
            "server_mode": self.server_mode,
            "servers": [
                {
                    "index": s.index,
                    "base_url": s.base_url,
                    "gpus": s.gpus if s.gpus == CPU else list(s.gpus),
                    "dp": s.dp,
                    "tp": s.tp,
                    "http_port": _port_dict(s.http),
                    "group_port": _port_dict(s.group),
                }
                for s in self.servers
            ],
            "external_servers": list(self.external_servers),
            "external_world_size": self.external_world_size,
            "notes": list(self.notes),
        }


def _port_dict(port: Port | None) -> dict | None:
    return None if port is None else {"port": port.port, "source": port.source}


# ----------------------------------------------------------------------------- GPU ids
def visible_to_physical(ids: Sequence[int], inherited: str | None, flag: str) -> tuple[int, ...]:
    """Map --gpus ids onto an inherited CUDA_VISIBLE_DEVICES (SLURM sets it): id i means its i-th entry.

    Without an inherited list the ids are used as they are. The deepspeed launcher needs the mapped
    ids for --include (it replaces CUDA_VISIBLE_DEVICES itself); torchrun gets them as
    CUDA_VISIBLE_DEVICES.
    """
    if not inherited or not inherited.strip():
        return tuple(ids)
    entries = [e.strip() for e in inherited.split(",") if e.strip()]
    if any(i >= len(entries) for i in ids):
        raise PlacementError(
            f"{flag} {','.join(map(str, ids))}: CUDA_VISIBLE_DEVICES={inherited} exposes only "
            f"{len(entries)} GPU(s) (ids 0..{len(entries) - 1} here)"
        )
    try:
        return tuple(int(entries[i]) for i in ids)
    except ValueError:
        raise PlacementError(
            f"CUDA_VISIBLE_DEVICES={inherited} holds non-integer ids (UUIDs?); set it to integer ids or unset it"
        ) from None


# ----------------------------------------------------------------------------- port checks
def check_ports(
    topo: Topology, host_is_local: Callable[[str], bool], is_free: Callable[[str, int], bool] = port_is_free
) -> None:
    """Every port this node binds must be free and used once; raises PlacementError naming each clash."""
    wanted: list[tuple[str, Port]] = []
    if topo.master_port is not None and topo.master_port.bind_here:
        host = topo.rdzv_endpoint.rsplit(":", 1)[0] if topo.rdzv_endpoint else topo.master_addr
        if host_is_local(host):
            wanted.append((host, topo.master_port))
    for srv in topo.servers:
        wanted += [(srv.host, srv.http), (srv.host, srv.group)]
    problems, seen = [], {}
    for host, port in wanted:
        if port.port in seen:
            problems.append(f"port {port.port} ({port.source}) is also {seen[port.port]}")
            continue
        seen[port.port] = f"{port.source}"
        if not is_free(host, port.port):
            problems.append(
                f"port {port.port} on {host} is already in use ({port.source}); "
                f"stop the process holding it (`ss -ltnp | grep :{port.port}`) or choose another port"
            )
    if problems:
        raise PlacementError("; ".join(problems))


# ----------------------------------------------------------------------------- building the plan
@dataclass(frozen=True)
class ProfileServers:
    """What the resolved profile says about rollout servers (read from ResolvedConfig by the caller)."""

    server_mode: bool
    servers: tuple[tuple[str, int], ...] = ()  # (base_url, group_port) in profile order
    tensor_parallel_size: int = 1


def build_topology(
    placement: Placement, profile: ProfileServers, env: Mapping[str, str], probe: Callable[[], int] = probe_free_port
) -> Topology:
    """The full placement of one launch on this node.

    Args:
        env: the environment to read SLURM_JOB_ID, MASTER_PORT and CUDA_VISIBLE_DEVICES from.
        probe: returns a free port when nothing configured one.
    Raises:
        PlacementError: server flags that do not fit the profile's servers, DP×TP ≠ server GPUs.
    """
    p, ids = placement, placement.learner_gpus
    learner = None if ids is None else visible_to_physical(ids, env.get("CUDA_VISIBLE_DEVICES"), "--gpus")
    started, external, notes, want = _plan_servers(p, profile, env)
    if p.rdzv:
        host, port = p.rdzv
        rdzv_id = env.get("SLURM_JOB_ID") or f"stage2-{port}"
        return Topology(
            learner,
            p.nproc_per_node,
            p.nnodes,
            p.node_rank,
            host,
            Port(port, "--rdzv-endpoint", bind_here=p.node_rank == 0),
            p.rdzv_endpoint,
            rdzv_id,
            started,
            external,
            want,
            profile.server_mode,
            notes,
        )
    return Topology(
        learner,
        p.nproc_per_node,
        1,
        0,
        "127.0.0.1",
        master_port(env, probe),
        None,
        "stage2",
        started,
        external,
        want,
        profile.server_mode,
        notes,
    )


def _plan_servers(
    place: Placement, profile: ProfileServers, env: Mapping[str, str]
) -> tuple[tuple[ServerPlan, ...], tuple[str, ...], tuple[str, ...], int | None]:
    """Which profile servers this launch starts (and on what), which must already be running, notes,
    and the world size expected of the running ones (--server-dp × TP, or None)."""
    server_ids, learner_ids = place.server_gpus, place.learner_gpus
    urls = tuple(url for url, _ in profile.servers)
    if not profile.server_mode:
        for flag, value in (
            ("--server-gpus", place.server_gpus),
            ("--server-dp", place.server_dp),
            ("--server-tp", place.server_tp),
        ):
            if value is not None:
                raise PlacementError(
                    f"{flag} needs a server-mode profile (rollout_matching.rollout_backend: vllm, "
                    "rollout_matching.vllm.mode: server)"
                )
        return (), (), (), None
    loopback = all(url_host_port(u)[0] in LOOPBACK for u in urls)
    start = server_ids is not None or (learner_ids is None and loopback)
    if not start or place.nnodes > 1:
        if server_ids is not None:
            raise PlacementError(
                "--server-gpus with --nnodes > 1: start the servers as their own job step "
                "(`stage2 serve`, see launchers/slurm/stage2_server_split.sbatch)"
            )
        if place.server_tp is not None and place.server_dp is None:
            raise PlacementError("--server-tp without --server-dp: give both to check running servers' world size")
        want = place.server_dp * _server_tp(place, profile) if place.server_dp else None
        note = f"server mode: using the running servers {', '.join(urls)}"
        return (), urls, (note + (f", each with world size {want}" if want else ""),), want
    if server_ids is not None and not loopback:
        raise PlacementError(
            f"servers started by stage2-launch listen on this machine, but the profile lists "
            f"{', '.join(urls)}; use 127.0.0.1 URLs or start remote servers with `stage2 serve`"
        )
    tp = _server_tp(place, profile)
    gpu_blocks = _split_server_gpus(server_ids, len(urls), tp, env) if server_ids else [CPU] * len(urls)
    dp = place.server_dp or (len(gpu_blocks[0]) // tp if server_ids else 1)
    if server_ids and dp * tp != len(gpu_blocks[0]):
        raise PlacementError(
            f"--server-dp {dp} × --server-tp {tp} = {dp * tp} must equal the GPUs per server "
            f"({len(gpu_blocks[0])}: --server-gpus {ids_text(server_ids)} over {len(urls)} server(s))"
        )
    plans = tuple(
        _server_plan(i, url, gport, gpu_blocks[i], dp, tp, env) for i, (url, gport) in enumerate(profile.servers)
    )
    return plans, (), (), None


def _server_tp(place: Placement, profile: ProfileServers) -> int:
    tp = profile.tensor_parallel_size
    if place.server_tp is not None and place.server_tp != tp:
        raise PlacementError(
            f"--server-tp {place.server_tp} differs from the profile's "
            f"rollout_matching.vllm.tensor_parallel_size={tp}; the profile is the one truth "
            f"(fix: --set rollout_matching.vllm.tensor_parallel_size={place.server_tp})"
        )
    return tp


def _split_server_gpus(ids: tuple[int, ...], count: int, tp: int, env: Mapping[str, str]) -> list[tuple[int, ...]]:
    """Contiguous equal blocks of --server-gpus, one per profile server (mapped onto CUDA_VISIBLE_DEVICES)."""
    if len(ids) % count:
        raise PlacementError(
            f"--server-gpus {ids_text(ids)} ({len(ids)} GPUs) does not split evenly over the "
            f"profile's {count} server(s)"
        )
    per = len(ids) // count
    if per % tp:
        raise PlacementError(f"each server gets {per} GPU(s), not a multiple of tensor_parallel_size={tp}")
    mapped = visible_to_physical(ids, env.get("CUDA_VISIBLE_DEVICES"), "--server-gpus")
    return [mapped[i * per : (i + 1) * per] for i in range(count)]


def _server_plan(i: int, url: str, group_port: int, gpus, dp: int, tp: int, env: Mapping[str, str]) -> ServerPlan:
    host, port = url_host_port(url)
    key = f"rollout_matching.vllm.server.servers[{i}]"
    job = env.get("SLURM_JOB_ID")
    if job:  # several jobs may share a node: the profile's 8000/51216 would clash
        http = Port(job_port(job, f"server{i}.http"), f"derived from SLURM_JOB_ID={job} (profile: {url})")
        group = Port(job_port(job, f"server{i}.group"), f"derived from SLURM_JOB_ID={job} (profile: {group_port})")
    else:
        http, group = Port(port, f"{key}.base_url={url}"), Port(group_port, f"{key}.group_port={group_port}")
    return ServerPlan(i, "127.0.0.1" if host == "localhost" else host, http, group, gpus, dp, tp)


def servers_rewritten(topo: Topology, profile: ProfileServers) -> bool:
    """Whether the started servers' endpoints differ from the profile (the learner then needs --set)."""
    planned = tuple((s.base_url, s.group.port) for s in topo.servers)
    return bool(planned) and planned != tuple((u.rstrip("/"), g) for u, g in profile.servers)


def local_hostnames() -> set[str]:
    """Names and addresses under which this machine may appear in --rdzv-endpoint."""
    names = {"127.0.0.1", "localhost", "::1", "0.0.0.0", socket.gethostname(), socket.gethostname().split(".")[0]}
    try:
        names.add(socket.getfqdn())
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return names
