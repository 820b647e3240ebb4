"""`stage2 launch` / `stage2-launch`: resolve → joint preflight → placement → start servers → learner.

Owns the command and the planning step that joins the pieces: the flags parsed once into a Placement
(toolkit/config/placement.py), the profile resolved for its learner world size (GA must divide: the config
error says so), the launcher contract (toolkit.preflight), ports and servers (launchers.topology), the run
folder (toolkit/runlayout.py), the argv/env of every child (launchers.commands), the
server probes (launchers.probe), and hands the plan to launchers.supervisor, which alone spawns.
Importing this module is cheap: no torch/transformers/deepspeed/vllm/fastapi, here or below.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import click

from launchers import commands, probe, topology
from launchers.plan import Plan, ProcessSpec, ServerSpec
from launchers.supervisor import LaunchError, Supervisor
from toolkit import runlayout
from toolkit.cli_options import ConfigFailure, profile_options
from toolkit.config.placement import Placement, PlacementError

log = logging.getLogger("stage2.launch")


@dataclass(frozen=True)
class LaunchRequest:
    """Everything `stage2-launch` was asked for."""

    profile: str
    sets: tuple[str, ...] = ()
    placement: Placement = field(default_factory=Placement)
    launcher: str = "torchrun"
    resume: str | None = None
    overwrite: bool = False
    health_timeout: float = 600.0
    stop_timeout: float = 600.0


@dataclass
class LaunchPlan:
    """The resolved launch: what --dry-run prints and what the supervisor runs."""

    request: LaunchRequest
    contract: dict
    topo: topology.Topology
    plan: Plan
    output_dir: Path
    expectation: probe.Expectation
    folder_notes: list[str]
    cfg: object  # the ResolvedConfig (learner world size)

    def to_dict(self, base_env: Mapping[str, str]) -> dict:
        def proc(spec: ProcessSpec) -> dict:
            return {"argv": spec.argv, "env": commands.env_delta(base_env, spec.env), "log": str(spec.log_path)}

        return {
            "profile": self.contract["profile"],
            "launcher": self.request.launcher,
            "contract": self.contract,
            "placement": self.topo.to_dict(),
            "servers": [
                {**proc(s.process), "base_url": s.base_url, "world_size": s.world_size} for s in self.plan.servers
            ],
            "learner": proc(self.plan.learner),
            "checks": {"server_min_model_len": self.expectation.min_model_len, "server_model": self.expectation.model},
            "output_dir": str(self.output_dir),
            "logs": str(self.output_dir / runlayout.LOGS),
            "checkpoints": str(self.output_dir / runlayout.CHECKPOINTS),
            "run_folder": self.folder_notes,
        }


def _profile_servers(cfg) -> topology.ProfileServers:
    server = cfg.derived.server_mode
    servers = tuple((s.base_url, s.group_port) for s in cfg.settings.server.servers) if server else ()
    return topology.ProfileServers(server, servers, cfg.settings.vllm.tensor_parallel_size)


def plan_launch(req: LaunchRequest, env: Mapping[str, str], python: str = sys.executable) -> LaunchPlan:
    """Resolve, check and plan one launch without starting anything (ports are test-bound only).

    Raises:
        ConfigError: the profile (incl. GA not dividing for this world size).
        PreflightError, PlacementError: contract or placement problems, taken ports.
    """
    from toolkit.config import load_profile
    from toolkit.preflight import build_preflight, check_multinode_servers

    cfg = load_profile(req.profile, req.sets, world_size=req.placement.world_size)
    servers_info = _profile_servers(cfg)
    topo = topology.build_topology(req.placement, servers_info, env)
    contract = build_preflight(cfg, req.placement)
    topology.check_ports(topo, lambda host: host in topology.local_hostnames())
    out = Path(cfg.training.output_dir)
    # The learner's rank 0 checks again; checking here fails before any server starts (nothing moved yet).
    notes = runlayout.claim_run_folder(
        out, runlayout.as_written(cfg), req.resume, req.overwrite, cfg.training.logging_dir, act=False
    )
    min_len = probe.required_model_len(cfg.global_max_length, contract["max_new_tokens"])
    want = probe.Expectation(None, contract["server_model"], min_len)
    sets = list(req.sets)
    if topology.servers_rewritten(topo, servers_info):
        sets.append(commands.servers_override(topo))
    profile = str(Path(cfg.profile_path).resolve())
    server_specs = [
        ServerSpec(
            ProcessSpec(
                f"server{s.index}",
                commands.build_server_argv(s, profile, sets, python),
                commands.build_server_env(env, topo, s),
                runlayout.process_log(out, f"server{s.index}", topo.node_rank),
            ),
            s.base_url,
            s.world_size,
            lambda url, w=want, n=s.world_size: probe.verify_server(
                url, probe.Expectation(n, w.model, w.min_model_len)
            ),
        )
        for s in topo.servers
    ]
    train_args = commands.build_train_args(profile, sets, req.resume)
    learner = ProcessSpec(
        "learner",
        commands.build_learner_argv(req.launcher, topo, train_args, python),
        commands.build_learner_env(env, topo, req.launcher, int(req.stop_timeout)),
        runlayout.process_log(out, "learner", topo.node_rank),
        tee=True,
        ignore_usr1=True,
    )
    check_multinode_servers(contract, topo.nnodes)  # after the flag checks above: those name the flag to fix
    plan = Plan(server_specs, learner, req.health_timeout, lambda t: checkpoint_since(out, t))
    return LaunchPlan(req, contract, topo, plan, out, want, notes, cfg)


def checkpoint_since(output_dir: Path, since: float) -> Path | None:
    """The newest complete checkpoint (trainer_state.json written last) finished after `since`."""
    done = [
        p
        for p in runlayout.complete_checkpoints(output_dir)
        if (p / runlayout.STATE_FILE).stat().st_mtime >= since - 1.0
    ]
    return done[-1] if done else None


def check_external_servers(lp: LaunchPlan) -> None:
    """Server mode without servers to start: each configured server must answer and match the plan."""
    problems = []
    for url in lp.topo.external_servers:
        ok, detail = probe.health(url)
        if not ok:
            problems.append(
                f"{url}/health/: {detail} (start it with `stage2 serve --profile {lp.request.profile} "
                f"--gpus …`, give --server-gpus to let stage2-launch start it, or fix the base_url)"
            )
            continue
        try:
            want = lp.expectation
            problems += probe.verify_server(
                url, probe.Expectation(lp.topo.external_world_size, want.model, want.min_model_len)
            )
        except probe.ProbeError as exc:
            problems.append(str(exc))
    if problems:
        raise LaunchError("configured rollout servers are not usable: " + "; ".join(problems))


def visible_gpu_count(env: Mapping[str, str]) -> int:
    """GPUs this process may use, without importing torch: CUDA_VISIBLE_DEVICES when set (SLURM sets it),
    else the NVIDIA driver's device list (/proc/driver/nvidia/gpus, then `nvidia-smi -L`)."""
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([x for x in cvd.split(",") if x.strip() and x.strip() != "-1"])
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return len(list(proc.iterdir()))
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
        return sum(1 for line in out.splitlines() if line.startswith("GPU "))
    return 0


def check_gpus_exist(topo: topology.Topology, env: Mapping[str, str]) -> None:
    """GPU ids on a machine without those GPUs would silently train on CPU: refuse them."""
    wanted = [i for ids in (topo.learner_gpus, *[s.gpus for s in topo.servers]) if isinstance(ids, tuple) for i in ids]
    if not wanted:
        return
    have = visible_gpu_count(env)
    if have == 0:
        raise LaunchError(
            f"GPU ids {','.join(map(str, sorted(set(wanted))))} were given but this machine has no "
            f"visible NVIDIA GPU (fix: --gpus cpu [--nproc N] for CPU ranks, or run on a GPU node)"
        )


def summary_line(lp: LaunchPlan, code: int, wall_s: float, reason: str) -> str:
    done = runlayout.complete_checkpoints(lp.output_dir)
    newest = f" (newest {done[-1].name})" if done else " (none complete)"
    reason = reason.split("\n", 1)[0]  # a failure's log tail was printed with the error already
    return (
        f"stage2-launch: exit {code} ({reason}) after {wall_s:.1f} s; logs: {lp.output_dir / runlayout.LOGS}; "
        f"checkpoints: {lp.output_dir / runlayout.CHECKPOINTS}{newest}"
    )


def run_launch(req: LaunchRequest, dry_run: bool = False) -> int:
    """Plan (and unless dry_run, run) one launch. Returns the exit code; raises ClickException on bad input."""
    from toolkit.config import ConfigError
    from toolkit.preflight import PreflightError, check_prerequisites

    env = dict(os.environ)
    try:
        lp = plan_launch(req, env)
        if dry_run:
            click.echo(json.dumps(lp.to_dict(env), indent=2))
            return 0
        check_prerequisites(lp.cfg)
        check_external_servers(lp)
        check_gpus_exist(lp.topo, env)
    except (ConfigError, PreflightError, PlacementError) as exc:
        raise ConfigFailure(exc) from None
    except (LaunchError, runlayout.RunFolderError) as exc:
        raise click.ClickException(str(exc)) from None
    log.info("profile %s; run folder %s", lp.contract["profile"], lp.output_dir)
    if req.overwrite:
        for note in runlayout.claim_run_folder(
            lp.output_dir, runlayout.as_written(lp.cfg), None, True, lp.cfg.training.logging_dir
        ):
            log.info("%s", note)
    outcome = Supervisor(stop_timeout=req.stop_timeout).run(lp.plan)
    click.echo(summary_line(lp, outcome.exit_code, outcome.wall_s, outcome.reason), err=True)
    return outcome.exit_code


def _setup_logging() -> None:
    logger = logging.getLogger("stage2.launch")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[stage2-launch %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _seconds_option(flag: str, help_text: str):
    """A launcher timeout: seconds, at least 1, default 600."""
    return click.option(flag, type=click.FloatRange(min=1), default=600.0, show_default=True, help=help_text)


@click.command("launch", context_settings={"help_option_names": ["-h", "--help"]})
@profile_options
@click.option(
    "--gpus", metavar="IDS|cpu", help="Learner GPUs on this node, e.g. 0,1 (one rank each), or cpu. Default: cpu."
)
@click.option("--nproc", type=click.IntRange(min=1), help="Learner ranks per node with --gpus cpu (default 1).")
@click.option("--server-gpus", metavar="IDS", help="GPUs for the rollout server(s) this launch starts (server mode).")
@click.option(
    "--server-dp",
    type=click.IntRange(min=1),
    help="Data-parallel engines per server (default: GPUs per server / TP); without --server-gpus: "
    "the DP running servers must report.",
)
@click.option(
    "--server-tp",
    type=click.IntRange(min=1),
    help="Tensor parallel size; must equal rollout_matching.vllm.tensor_parallel_size.",
)
@click.option(
    "--nnodes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Learner nodes (torchrun c10d rendezvous).",
)
@click.option(
    "--node-rank", type=click.IntRange(min=0), default=0, show_default=True, help="This node's rank (0..nnodes-1)."
)
@click.option(
    "--rdzv-endpoint",
    metavar="HOST:PORT",
    help="Rendezvous of a multi-node run: the first node and one port, the same everywhere.",
)
@click.option(
    "--launcher", type=click.Choice(commands.LAUNCHERS), default="torchrun", show_default=True, help="Learner launcher."
)
@click.option(
    "--resume",
    metavar="auto|PATH",
    help="Resume from the newest complete checkpoint (auto; the run's config must match) or PATH.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start a new run in a folder holding another run: move that run to <output_dir>.old-<time>/ first.",
)
@click.option(
    "--dry-run", is_flag=True, help="Print placement, contract, exact commands and env changes as JSON; start nothing."
)
@_seconds_option("--health-timeout", "Seconds to wait for /health/ of started servers.")
@_seconds_option("--stop-timeout", "Seconds the learner gets to checkpoint after a stop signal.")
def launch(
    profile,
    sets,
    gpus,
    nproc,
    server_gpus,
    server_dp,
    server_tp,
    nnodes,
    node_rank,
    rdzv_endpoint,
    launcher,
    resume,
    overwrite,
    dry_run,
    health_timeout,
    stop_timeout,
) -> None:
    """Launch a Stage-2 run: joint preflight, rollout servers (server mode), then the learner.

    \b
    Examples:
      stage2-launch --profile smoke/ab_mixed --gpus cpu --nproc 2          # CPU demo, 2 ranks
      stage2-launch --profile prod/ab_mixed --gpus 0,1 --server-gpus 2,3   # 2 learners + server (DP 2)
      stage2-launch --profile prod/ab_mixed --gpus 0,1 --launcher deepspeed --resume auto
      stage2-launch --profile prod/ab_mixed --gpus 0,1,2,3 --nnodes 2 --node-rank 0 --rdzv-endpoint node001:29500
      stage2-launch --profile prod/ab_mixed --gpus 0,1 --dry-run | jq .learner.argv
    \b
    Signals: SIGINT/SIGTERM/SIGUSR1 go to the learner, which finishes the step, checkpoints and exits
    128+N (SIGUSR1 → 138); a second Ctrl-C kills. Logs: <output_dir>/logs/{learner,server0,...}.log.
    Exit code: the learner's (0 done, 1 launch or learner failure, 128+N after a stop signal).
    """
    _setup_logging()
    try:
        placement = Placement.from_flags(
            gpus, nproc, server_gpus, server_dp, server_tp, nnodes, node_rank, rdzv_endpoint
        )
    except PlacementError as exc:
        raise ConfigFailure(exc) from None
    req = LaunchRequest(profile, sets, placement, launcher, resume, overwrite, health_timeout, stop_timeout)
    sys.exit(run_launch(req, dry_run))
