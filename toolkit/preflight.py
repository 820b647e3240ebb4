"""The launcher contract: one JSON object that tells `stage2-launch` what to start, schema-checked.

`build_preflight(cfg, placement)` reads a ResolvedConfig (never YAML) and the launch's Placement
(toolkit/config/placement.py: the flags, parsed once) and returns a dict; `validate_preflight(d)` checks it
against PREFLIGHT_SCHEMA and fails fast naming the field. No network calls here: server reachability belongs
to the launcher. Must never import torch, transformers, deepspeed, vllm or fastapi.

Example (`stage2 preflight --profile prod/ab_mixed --gpus 0,1 --server-gpus 2,3`):
    {"rollout_backend": "vllm", "vllm_mode": "server", "server_base_urls": ["http://127.0.0.1:8000"],
     "group_ports": [51216], "learner_world_size": 2, "gradient_accumulation_steps": 28, ...}
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from voluptuous import PREVENT_EXTRA, Invalid, MultipleInvalid, Required, Schema

from toolkit.config.atoms import Bool, Const, Either, Enum, Int, ListOf, Nullable, Str
from toolkit.config.placement import CPU, Placement
from toolkit.config.resolved import ResolvedConfig


class PreflightError(ValueError):
    """The placement does not fit the profile, or a contract field is missing or invalid; the message names it."""


PREFLIGHT_SCHEMA = Schema(
    {
        Required("rollout_backend"): Enum("hf", "vllm"),
        Required("vllm_mode"): Nullable(Enum("colocate", "server")),
        Required("server_base_urls"): ListOf(Str()),
        Required("group_ports"): ListOf(Int(lo=1024, hi=65535)),
        Required("learner_world_size"): Int(lo=1),
        Required("learner_gpus"): Either(Const(CPU), ListOf(Int(lo=0))),
        Required("server_gpus"): ListOf(Int(lo=0)),
        Required("gradient_accumulation_steps"): Int(lo=1),
        Required("decode_batch_size"): Int(lo=1),
        Required("effective_batch_size"): Int(lo=1),
        Required("per_rank_samples_per_step"): Int(lo=1),
        Required("server_model"): Str(),
        Required("max_model_len"): Nullable(Int(lo=1)),
        Required("max_new_tokens"): Int(lo=1),
        Required("tensor_parallel_size"): Int(lo=1),
        Required("vllm_sync_mode"): Enum("full", "adapter"),
        Required("repeat_terminate_enabled"): Bool(),
        Required("output_dir"): Str(),
        Required("profile"): Str(),
        Required("overrides"): ListOf(Str()),
    },
    extra=PREVENT_EXTRA,
)


def validate_preflight(d: Any) -> dict:
    """Check a contract dict; raises PreflightError naming every missing or invalid field."""
    try:
        out = PREFLIGHT_SCHEMA(d)
    except MultipleInvalid as exc:
        problems = []
        for err in exc.errors:
            name = ".".join(str(p) for p in err.path) or "<contract>"
            text = {"required key not provided": "missing", "extra keys not allowed": "unknown field"}.get(
                err.error_message, err.error_message
            )
            problems.append(f"preflight field '{name}': {text}")
        raise PreflightError("; ".join(sorted(problems))) from None
    except Invalid as exc:
        raise PreflightError(f"preflight contract: {exc.error_message}") from None
    server = out["rollout_backend"] == "vllm" and out["vllm_mode"] == "server"
    if (out["rollout_backend"] == "hf") != (out["vllm_mode"] is None):
        raise PreflightError("preflight field 'vllm_mode': must be null exactly when rollout_backend is hf")
    if server and not out["server_base_urls"]:
        raise PreflightError("preflight field 'server_base_urls': empty in server mode")
    if len(out["group_ports"]) != len(out["server_base_urls"]):
        raise PreflightError("preflight field 'group_ports': one per server_base_urls entry")
    return out


def _check_placement(cfg: ResolvedConfig, placement: Placement) -> None:
    """What the placement must agree on with the profile (the flags among themselves: Placement.from_flags)."""
    world = placement.world_size
    if world != cfg.derived.learner_world_size:
        raise PreflightError(
            f"the config was resolved for learner world size {cfg.derived.learner_world_size} "
            f"but the placement has {world}; load it with world_size={world}"
        )
    settings, server_gpus = cfg.settings, placement.server_gpus or ()
    if server_gpus and not cfg.derived.server_mode:
        raise PreflightError(
            "--server-gpus needs rollout_backend: vllm with vllm.mode: server "
            f"(the profile has {settings.rollout_backend}/{settings.vllm.mode})"
        )
    tp = settings.vllm.tensor_parallel_size
    if server_gpus and len(server_gpus) % tp:
        raise PreflightError(
            f"--server-gpus has {len(server_gpus)} GPUs, not a multiple of vllm.tensor_parallel_size={tp}"
        )


def _check_model(model: str, backend: str) -> None:
    """An architecture the learner or the backend cannot run is refused here, before anything starts."""
    from toolkit.vlm.support import ModelSupportError, check_model_support

    try:
        check_model_support(model, backend)
    except ModelSupportError as err:
        raise PreflightError(str(err)) from None


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def check_multinode_servers(contract: dict, nnodes: int) -> None:
    """A multi-node launch cannot use loopback server URLs: each node would talk to a server on itself,
    yet only the first learner rank pushes weights (and no node starts servers). Raises PreflightError."""
    from urllib.parse import urlsplit

    if nnodes <= 1:
        return
    local = [
        u
        for u in contract["server_base_urls"]
        if (urlsplit(u).hostname or "") in LOOPBACK_HOSTS or (urlsplit(u).hostname or "").startswith("127.")
    ]
    if local:
        raise PreflightError(
            f"rollout_matching.vllm.server.servers: {', '.join(local)} is a loopback address, but this launch "
            f"spans {nnodes} nodes: every node would reach only a server on itself. Start the servers on "
            "their own nodes with launchers/slurm/stage2_server_split.sbatch (it hands their URLs to the "
            "learners), or list URLs every node can reach (http://<server node>:<port>)"
        )


def build_preflight(cfg: ResolvedConfig, placement: Placement | None = None) -> dict:
    """The validated launcher contract of a resolved config and its placement (all nodes: the world spans them).

    Raises:
        PreflightError: a placement that does not fit the profile (world size differing from the one cfg
            was resolved with, --server-gpus outside server mode or not a multiple of TP) or an invalid
            contract field.
    """
    placement = placement or Placement()  # one CPU rank
    _check_placement(cfg, placement)
    settings = cfg.settings  # the same typed settings the trainer reads
    backend, vllm = settings.rollout_backend, settings.vllm
    _check_model(cfg.model.model, backend)
    servers = settings.server.servers if cfg.derived.server_mode else ()
    return validate_preflight(
        {
            "rollout_backend": backend,
            "vllm_mode": vllm.mode if backend == "vllm" else None,
            "server_base_urls": [s.base_url for s in servers],
            "group_ports": [s.group_port for s in servers],
            "learner_world_size": placement.world_size,
            "learner_gpus": CPU if placement.cpu else list(placement.learner_gpus),
            "server_gpus": list(placement.server_gpus or ()),
            "gradient_accumulation_steps": cfg.derived.gradient_accumulation_steps,
            "decode_batch_size": cfg.derived.decode_batch_size,
            "effective_batch_size": cfg.training.effective_batch_size,
            "per_rank_samples_per_step": cfg.derived.per_rank_samples_per_step,
            "server_model": cfg.model.model,
            "max_model_len": vllm.max_model_len if backend == "vllm" else None,
            "max_new_tokens": settings.decode.max_new_tokens,
            "tensor_parallel_size": vllm.tensor_parallel_size,
            "vllm_sync_mode": cfg.derived.vllm_sync_mode,
            "repeat_terminate_enabled": settings.decode.repeat is not None,
            "output_dir": cfg.training.output_dir,
            "profile": str(Path(cfg.profile_path).resolve()),
            "overrides": list(cfg.overrides),
        }
    )


def _local_model_path(value: str) -> bool:
    """A model.model that names a folder, not a hub id: absolute, ./ or ~ prefixed, or more than org/name."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1


def missing_prerequisites(cfg: ResolvedConfig) -> list[str]:
    """What the run needs on this machine and is not there: the model folder, the records files, the wandb
    package when a sink asks for it (no network, no import: checked before any model loads)."""
    problems = []
    if "wandb" in cfg.training.report_to and importlib.util.find_spec("wandb") is None:
        problems.append(
            "training.report_to: wandb is listed but the wandb package is not installed "
            "(fix: pip install -e '.[wandb]', or remove wandb from training.report_to)"
        )
    model = cfg.model.model
    if _local_model_path(model) and not Path(model).expanduser().is_dir():
        problems.append(
            f"model.model: no folder {model} (fix: point it at a Hugging Face model folder, "
            f"e.g. --set model.model=/path/to/stage1; a hub id looks like org/name)"
        )
    data = cfg.data
    wanted = [("data.train_jsonl", data.train_jsonl)]
    if data.val_jsonl:  # the trainer loads it whenever it is set
        wanted.append(("data.val_jsonl", data.val_jsonl))
    for key, path in wanted:
        if not Path(path).exists():  # a directory (or other non-record file) is the loader's clear error
            problems.append(f"{key}: no file {path} (fix: --set {key}=/path/to/records.jsonl; docs/DATA.md)")
    return problems


def check_prerequisites(cfg: ResolvedConfig) -> None:
    """Raise PreflightError listing every missing model folder / records file / package before anything starts."""
    problems = missing_prerequisites(cfg)
    if problems:
        raise PreflightError("; ".join(problems))


def preflight_for_profile(
    profile: str | Path, overrides: Sequence[str] = (), placement: Placement | None = None
) -> dict:
    """Resolve the profile for the placement's learner world size and build the contract."""
    from toolkit.config import load_profile

    placement = placement or Placement()
    return build_preflight(load_profile(profile, overrides, world_size=placement.world_size), placement)
