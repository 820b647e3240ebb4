"""What the supervisor runs: the children of one launch (argv, environment, log file), the rollout servers'
checks, and the outcome `Supervisor.run` returns (launchers/supervisor.py). Plain data, built by
launchers/launch_cmd.py. Must never import torch, transformers, deepspeed, vllm or fastapi.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ProcessSpec:
    """One child: what to run, with which environment, where its output goes."""

    name: str
    argv: list[str]
    env: dict
    log_path: Path
    tee: bool = False  # also copy output to the console (stderr)
    ignore_usr1: bool = False  # launcher wrappers ignore SIGUSR1; the ranks install their own handler


@dataclass
class ServerSpec:
    """A rollout server to start and the checks it must pass before the learner starts."""

    process: ProcessSpec
    base_url: str
    world_size: int  # planned DP × TP
    verify: Callable[[str], list[str]] = lambda url: []  # further checks (model, max_model_len)


@dataclass
class Plan:
    servers: list[ServerSpec]
    learner: ProcessSpec
    health_timeout: float = 600.0
    checkpointed_since: Callable[[float], Path | None] = lambda t: None  # newest checkpoint written after t


@dataclass
class Outcome:
    exit_code: int
    wall_s: float
    reason: str
    logs: list[Path] = field(default_factory=list)
