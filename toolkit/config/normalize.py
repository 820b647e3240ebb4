"""Normalization: project-root paths, null-means defaults, and the derived values.

`derive()` is THE function the trainer, preflight and `stage2 config` share; nothing else may recompute
these values (the typed runtime view is settings.py). Imports stdlib only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from toolkit.config.errors import OVERRIDE_SOURCE
from toolkit.config.rules import batch_split_error, resolve_sync_mode
from toolkit.config.schema import MODEL_PATH_KEY, PATH_KEYS
from toolkit.config.yamlio import Document


def project_root_for(profile: Path) -> Path:
    """The parent of the nearest `configs/` directory above the profile, else the profile's directory."""
    profile = Path(profile).resolve()
    for parent in profile.parents:
        if parent.name == "configs":
            return parent.parent
    return profile.parent


def _looks_like_path(value: str, base: Path) -> bool:
    if value.startswith((".", "/", "~")):
        return True
    return "/" in value and (base / value).exists()


def base_for(path: tuple, doc: Document, project_root: Path, cwd: Path) -> Path:
    """The folder a relative path value resolves against: the project root of the file that WROTE the value
    (so a profile outside the repo that extends a canonical one keeps the parent's `assets/...` pointing into
    the repo), the cwd for a --set value, and `project_root` (the loaded profile's) for a schema default."""
    written = doc.positions.get(path)
    if written is None:
        return project_root
    if written.file == OVERRIDE_SOURCE:
        return cwd
    return project_root_for(Path(written.file))


def resolve_paths(cfg: dict, doc: Document, project_root: Path, cwd: Path) -> None:
    """Make relative path values absolute in place, each against `base_for` its writer."""
    for path in PATH_KEYS + (MODEL_PATH_KEY,):
        section, key = path
        value = cfg[section].get(key)
        if not isinstance(value, str):
            continue
        base = base_for(path, doc, project_root, cwd)
        if path == MODEL_PATH_KEY and not _looks_like_path(value, base):
            continue  # a hub id such as Qwen/Qwen3-VL-4B-Instruct
        expanded = os.path.expanduser(value)
        cfg[section][key] = os.path.normpath(expanded if os.path.isabs(expanded) else str(base / expanded))


def fill_null_defaults(cfg: dict) -> None:
    """Resolve the keys whose null means "same as another key", in place (after resolve_paths):
    training.vit_lr/aligner_lr ← learning_rate; rollout_matching.vllm.server.infer_timeout_s ← timeout_s;
    training.logging_dir ← <output_dir>/tb (so TensorBoard follows a --set training.output_dir).
    (data.image_root stays null: the loader then resolves each records file's images against its own directory.)"""
    training = cfg["training"]
    for key in ("vit_lr", "aligner_lr"):
        if training[key] is None:
            training[key] = training["learning_rate"]
    if training.get("logging_dir") is None:
        training["logging_dir"] = os.path.join(training["output_dir"], "tb")
    server = cfg["rollout_matching"]["vllm"]["server"]
    if server["infer_timeout_s"] is None:
        server["infer_timeout_s"] = server["timeout_s"]


@dataclass(frozen=True)
class Derived:
    """Values computed from the profile and the learner world size, never hand-set."""

    learner_world_size: int
    gradient_accumulation_steps: int  # E / (P × W)
    decode_batch_size: int  # rollout and rollout-aware eval microbatch
    eval_batch_size: int  # = decode_batch_size
    rollouts_per_step: int  # Channel-B raw rollouts per optimizer step = E
    per_rank_samples_per_step: int  # E / W
    vllm_sync_mode: str  # vllm.sync.mode with auto resolved
    server_mode: bool  # rollouts come from rollout servers (rollout_backend vllm, vllm.mode server)

    def to_dict(self) -> dict:
        return asdict(self)


DERIVED_DOCS = {
    "learner_world_size": "W: learner ranks (number of --gpus ids, or --nproc with --gpus cpu; 1 by default).",
    "gradient_accumulation_steps": "E / (P × W), exact division required; written back to "
    "training.gradient_accumulation_steps.",
    "decode_batch_size": "rollout_matching.decode_batch_size: sequences per decode call (HF generate, vLLM per "
    "rollout GPU).",
    "eval_batch_size": "= decode_batch_size; written back to training.per_device_eval_batch_size.",
    "rollouts_per_step": "= E: Channel-B raw rollouts per optimizer step over all ranks.",
    "per_rank_samples_per_step": "E / W: raw samples each rank buffers and executes per optimizer step.",
    "vllm_sync_mode": "rollout_matching.vllm.sync.mode with auto resolved (adapter iff LoRA is trained and served).",
    "server_mode": "true when rollouts come from rollout servers (rollout_backend: vllm with vllm.mode: server).",
}


def derive(cfg: Mapping[str, Any], world_size: int) -> Derived:
    """Derived values of a typed config. Raises ValueError (naming every factor) when E % (P × W) != 0."""
    e = cfg["training"]["effective_batch_size"]
    p = cfg["training"]["per_device_train_batch_size"]
    w = int(world_size)
    problem = batch_split_error(e, p, w)  # the same check as the rule that reports it with a fix
    if problem:
        raise ValueError(problem)
    rm = cfg["rollout_matching"]
    d = rm["decode_batch_size"]
    return Derived(
        learner_world_size=w,
        gradient_accumulation_steps=e // (p * w),
        decode_batch_size=d,
        eval_batch_size=d,
        rollouts_per_step=e,
        per_rank_samples_per_step=e // w,
        vllm_sync_mode=resolve_sync_mode(dict(cfg)),
        server_mode=rm["rollout_backend"] == "vllm" and rm["vllm"]["mode"] == "server",
    )


def apply_derived(cfg: dict, derived: Derived) -> None:
    """Write derived values back into the typed config so the resolved view is self-consistent."""
    cfg["training"]["gradient_accumulation_steps"] = derived.gradient_accumulation_steps
    cfg["training"]["per_device_eval_batch_size"] = derived.eval_batch_size
