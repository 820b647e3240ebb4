"""argv and environment builders for every process `stage2-launch` starts (pure: lists and dicts in, out).

Owns the mapping of one `--gpus` flag onto each launcher:
  * torchrun:  CUDA_VISIBLE_DEVICES=<ids> + --nproc_per_node <n> (ranks see cuda:0..n-1);
  * deepspeed: --include localhost:<ids> and NEVER CUDA_VISIBLE_DEVICES (its runner rewrites it and
    ignores --include when it finds one); on CPU --num_gpus <n> (one rank per "CPU accelerator").
Both run the same per-rank entry point `python -m toolkit.train --profile … --set … [--resume …]`.
The rollout server runs as `python -m toolkit.rollout.server --profile … --gpus … --dp … --tp …
--host … --port … [--set …]`. Nothing here touches os.environ, the filesystem or processes;
launchers/supervisor.py is the only place that spawns. Must never import torch, transformers,
deepspeed, vllm or fastapi.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from launchers.ports import LOOPBACK, url_host_port
from launchers.topology import ServerPlan, Topology
from toolkit.config.placement import CPU, PlacementError

TRAIN_MODULE = "toolkit.train"
SERVER_MODULE = "toolkit.rollout.server"
LAUNCHERS = ("torchrun", "deepspeed")
# torchrun forwards these to the ranks; SIGUSR1 is SLURM's usual pre-timeout signal (not in torch's default list).
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
SERVERS_KEY = "rollout_matching.vllm.server.servers"


def build_train_args(profile: str, sets: Sequence[str], resume: str | None) -> list[str]:
    """The per-rank entry point's arguments (after `-m toolkit.train`)."""
    args = ["--profile", profile]
    for item in sets:
        args += ["--set", item]
    return args + (["--resume", resume] if resume else [])


def servers_override(topo: Topology) -> str:
    """`--set` value that hands the started servers' endpoints to the learner (and the servers)."""
    items = ", ".join(f"{{base_url: '{s.base_url}', group_port: {s.group.port}}}" for s in topo.servers)
    return f"{SERVERS_KEY}=[{items}]"


def build_torchrun_argv(topo: Topology, train_args: Sequence[str], python: str = "python") -> list[str]:
    """`python -m toolkit.torchrun …` (torchrun's flags; one line instead of a traceback on a clean stop) for
    this node.

    Single node: --master_addr/--master_port (a port chosen by topology, never torchrun's 29500 default).
    Multi-node: c10d rendezvous at --rdzv_endpoint with --rdzv_id, the same on every node; no
    --node_rank (c10d ignores it, with a warning, and gives global ranks in join order). How long
    torchrun lets ranks checkpoint after a forwarded signal is TORCH_ELASTIC_SHUTDOWN_TIMEOUT in the
    env (build_learner_env): the --shutdown_timeout flag exists in torch 2.13 but not in 2.11, whose
    torchrun rejects it, while unknown env vars are ignored.
    """
    argv = [
        python,
        "-m",
        "toolkit.torchrun",
        "--nnodes",
        str(topo.nnodes),
        "--nproc_per_node",
        str(topo.nproc_per_node),
    ]
    if topo.rdzv_endpoint:
        argv += ["--rdzv_backend", "c10d", "--rdzv_endpoint", topo.rdzv_endpoint, "--rdzv_id", topo.rdzv_id]
    else:
        argv += ["--master_addr", topo.master_addr, "--master_port", str(topo.master_port.port)]
    argv += ["--max_restarts", "0", "--signals_to_handle", TORCHRUN_SIGNALS]
    return argv + ["-m", TRAIN_MODULE, *train_args]


def build_deepspeed_argv(topo: Topology, train_args: Sequence[str], python: str = "python") -> list[str]:
    """`python -m deepspeed.launcher.runner …` for a single node.

    --no_local_rank: our entry point reads LOCAL_RANK from the environment, not a --local_rank flag.
    Raises:
        PlacementError: multi-node (the deepspeed runner needs ssh/pdsh and a hostfile; use torchrun).
    """
    if topo.nnodes > 1 or topo.rdzv_endpoint:
        raise PlacementError(
            "--launcher deepspeed runs one node here (its multi-node mode needs ssh/pdsh and a "
            "hostfile); use --launcher torchrun with --nnodes/--rdzv-endpoint"
        )
    argv = [python, "-m", "deepspeed.launcher.runner"]
    if topo.cpu:
        argv += ["--num_gpus", str(topo.nproc_per_node)]
    else:
        argv += ["--include", "localhost:" + ",".join(map(str, topo.learner_gpus))]
    argv += ["--no_local_rank", "--master_addr", topo.master_addr, "--master_port", str(topo.master_port.port)]
    return argv + ["--module", TRAIN_MODULE, *train_args]


def build_learner_argv(launcher: str, topo: Topology, train_args: Sequence[str], python: str = "python") -> list[str]:
    """The learner command for `--launcher torchrun|deepspeed`."""
    if launcher == "torchrun":
        return build_torchrun_argv(topo, train_args, python)
    if launcher == "deepspeed":
        return build_deepspeed_argv(topo, train_args, python)
    raise PlacementError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")


def build_server_argv(server: ServerPlan, profile: str, sets: Sequence[str], python: str = "python") -> list[str]:
    """`python -m toolkit.rollout.server …` for one planned server."""
    gpus = CPU if server.gpus == CPU else ",".join(map(str, server.gpus))
    argv = [
        python,
        "-m",
        SERVER_MODULE,
        "--profile",
        profile,
        "--gpus",
        gpus,
        "--dp",
        str(server.dp),
        "--tp",
        str(server.tp),
        "--host",
        server.host,
        "--port",
        str(server.http.port),
    ]
    for item in sets:
        argv += ["--set", item]
    return argv


def _no_proxy(env: Mapping[str, str], hosts: Sequence[str]) -> str:
    current = [h.strip() for h in (env.get("NO_PROXY") or env.get("no_proxy") or "").split(",") if h.strip()]
    for host in ("127.0.0.1", "localhost", *hosts):
        if host and host not in current:
            current.append(host)
    return ",".join(current)


def _common_env(base: Mapping[str, str], topo: Topology) -> dict:
    """Shared by every child: unbuffered output, one OpenMP thread unless set, loopback never proxied."""
    env = dict(base)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    urls = [s.base_url for s in topo.servers] + list(topo.external_servers)
    hosts = [url_host_port(u)[0] for u in urls]
    env["NO_PROXY"] = env["no_proxy"] = _no_proxy(base, hosts)
    if all(h in LOOPBACK for h in hosts):  # a proxy must never see loopback traffic
        for var in PROXY_VARS:
            env.pop(var, None)
    return env


def build_learner_env(base: Mapping[str, str], topo: Topology, launcher: str, stop_timeout: int = 600) -> dict:
    """The learner launcher's environment (torchrun/deepspeed pass it on to every rank).

    stop_timeout: seconds torchrun lets the ranks finish a step and checkpoint after a forwarded stop
    signal before it SIGKILLs them (its default is 30 s).
    """
    env = _common_env(base, topo)
    if launcher == "torchrun":
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(stop_timeout)
    if launcher == "deepspeed":
        env.pop("CUDA_VISIBLE_DEVICES", None)  # devices go through --include/--num_gpus; the runner sets it per rank
    elif topo.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --gpus cpu means no GPU, even on a GPU machine
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, topo.learner_gpus))
    if topo.cpu:
        env["DS_ACCELERATOR"] = "cpu"  # explicit, and silences DeepSpeed's detection warning on stdout
    return env


def build_server_env(base: Mapping[str, str], topo: Topology, server: ServerPlan) -> dict:
    """One rollout server's environment: its GPUs only (none on CPU)."""
    env = _common_env(base, topo)
    env["CUDA_VISIBLE_DEVICES"] = "" if server.gpus == CPU else ",".join(map(str, server.gpus))
    return env


MANAGED_VARS = (
    "PYTHONUNBUFFERED",
    "OMP_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
    "NO_PROXY",
    "no_proxy",
    "CUDA_VISIBLE_DEVICES",
    "DS_ACCELERATOR",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
    *PROXY_VARS,
)


def env_delta(base: Mapping[str, str], env: Mapping[str, str]) -> dict:
    """The child env for --dry-run: every variable the builders manage plus anything else that differs
    from the launcher's own environment; {VAR: value, or None when removed}."""
    keys = {k for k in MANAGED_VARS if k in env or k in base}
    keys |= {k for k, v in env.items() if base.get(k) != v} | {k for k in base if k not in env}
    return {k: env.get(k) for k in sorted(keys)}
