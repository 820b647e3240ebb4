"""One run's folder: where each file of a run lives, and the rule that a run owns its folder.

    <output_dir>/
        resolved_config.yaml       the config the run trains with; first line: the profile file used
        metrics.jsonl              one line per optimizer step; "step" = optimizer steps completed (1, 2, …)
        tb/                        TensorBoard events (training.logging_dir, unless set elsewhere)
        checkpoints/step-000040/   the state after 40 optimizer steps; complete iff trainer_state.json exists
            ds/  rng/rank0.pt …  hf/  trainer_state.json   (what each holds: toolkit/trainer/checkpoint.py)
        monitor_dumps/step_000040.jsonl   Channel-B rollouts of step 40 (rollout_matching.monitor_dump)
        monitor_dumps/eval_step_000040/   eval pictures of step 40
        eval/<checkpoint>/         `stage2 eval` results (eval.json, predictions.jsonl, pictures/)
        logs/                      stage2-launch's per-process logs (learner.log, server0.log, …; -nodeK on node K)

A fresh run refuses a folder that holds another run's checkpoints or metrics (`claim_run_folder`);
`--resume auto` continues only a run whose resolved config matches, except for the keys in
RESUME_MAY_CHANGE (docs/STAGE2_RUNBOOK.md, "One run, one folder"). Stdlib and PyYAML only: the trainer,
the launcher and `stage2` read it without importing torch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESOLVED_CONFIG = "resolved_config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TB = "tb"
LOGS = "logs"
MONITOR_DUMPS = "monitor_dumps"
EVAL = "eval"
STATE_FILE = "trainer_state.json"  # written last: a checkpoint is complete iff it exists
CHECKPOINT_DS = "ds"  # inside a checkpoint: the DeepSpeed checkpoint
CHECKPOINT_HF = "hf"  # inside a checkpoint: the `save_pretrained` export
CHECKPOINT_RNG = "rng"  # inside a checkpoint: one RNG state file per rank

# Resolved-config keys (dotted prefixes) that `--resume auto` lets differ from the run being continued:
# how long it runs and how it logs/saves, where servers listen, and what the world size derives.
RESUME_MAY_CHANGE = (
    "training.max_steps",
    "training.num_train_epochs",
    "training.logging_steps",
    "training.report_to",
    "training.eval_strategy",
    "training.eval_steps",
    "training.save_strategy",
    "training.save_steps",
    "training.save_total_limit",
    "training.output_dir",
    "training.logging_dir",
    "training.gradient_accumulation_steps",
    "training.per_device_eval_batch_size",
    "data.val_sample_limit",
    "rollout_matching.vllm.server.servers",
    "rollout_matching.vllm.server.timeout_s",
    "rollout_matching.vllm.server.infer_timeout_s",
    "rollout_matching.monitor_dump",
)


class RunFolderError(RuntimeError):
    """The output folder belongs to another run (or to a run with another config); the message says the fix."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """The checkpoint taken after `step` optimizer steps."""
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name.split("-", 1)[1])


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under output_dir, oldest step first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def checkpoint_run_id(path: Path) -> str | None:
    """The run id a complete checkpoint was written by (None for one written before run ids existed)."""
    try:
        return json.loads((Path(path) / STATE_FILE).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def rng_file(ckpt: str | Path, rank: int) -> Path:
    return Path(ckpt) / CHECKPOINT_RNG / f"rank{rank}.pt"


def monitor_dump_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / MONITOR_DUMPS / f"step_{step:06d}.jsonl"


def eval_pictures_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / MONITOR_DUMPS / f"eval_step_{step:06d}"


def process_log(output_dir: str | Path, name: str, node_rank: int = 0) -> Path:
    """stage2-launch's log of one child (learner, server0, …); nodes after the first add -node<K>."""
    return Path(output_dir) / LOGS / (f"{name}.log" if node_rank == 0 else f"{name}-node{node_rank}.log")


def run_traces(output_dir: str | Path) -> list[str]:
    """What in output_dir shows that a run trained there: metrics lines, checkpoints (any, even partial).
    resolved_config.yaml and logs/ alone do not count (a run that failed during setup left nothing)."""
    out = Path(output_dir)
    traces = []
    metrics = out / METRICS
    if metrics.is_file() and metrics.stat().st_size > 0:
        steps = sum(1 for line in metrics.read_text().splitlines() if line.strip())
        traces.append(f"{metrics} ({steps} steps)")
    ckpts = sorted((out / CHECKPOINTS).glob("step-*")) if (out / CHECKPOINTS).is_dir() else []
    if ckpts:
        traces.append(f"{out / CHECKPOINTS} ({', '.join(p.name for p in ckpts)})")
    return traces


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for key, value in d.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(old: Mapping, new: Mapping) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every leaf that differs between two resolved configs, sorted by key."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    return sorted(
        (k, a.get(k, missing), b.get(k, missing)) for k in set(a) | set(b) if a.get(k, missing) != b.get(k, missing)
    )


def _may_change(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE)


def _show(v: Any) -> str:
    return "(absent)" if type(v) is object else repr(v)


def as_written(cfg) -> dict:
    """A ResolvedConfig as its resolved_config.yaml reads back (lists, not tuples), for comparing."""
    import yaml

    return yaml.safe_load(cfg.to_yaml())


def read_resolved(output_dir: str | Path) -> dict | None:
    """The resolved config a run in output_dir wrote (comments skipped), or None."""
    import yaml

    path = Path(output_dir) / RESOLVED_CONFIG
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def move_aside(output_dir: str | Path) -> Path:
    """Rename output_dir to `<output_dir>.old-<YYYYmmdd-HHMMSS>` (never deletes); returns the new path."""
    out = Path(output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = out.with_name(f"{out.name}.old-{stamp}"), 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.old-{stamp}-{n}")
    os.rename(out, target)
    return target


def _fix(output_dir: Path) -> str:
    return (
        f"fix: continue it with `--resume auto`, pick another folder with `--set training.output_dir=…`, "
        f"or pass `--overwrite` to move the old run to {output_dir.name}.old-<time>/ (nothing is deleted)"
    )


def claim_run_folder(
    output_dir: str | Path,
    new_config: Mapping,
    resume: str | None = None,
    overwrite: bool = False,
    logging_dir: str | Path | None = None,
    act: bool = True,
) -> list[str]:
    """Check that this run may write into output_dir; returns lines to log (what was moved or what differs).

    fresh (no --resume, or --resume PATH outside output_dir): the folder must hold no run traces, or
        `overwrite` moves it aside (and a logging_dir outside it that holds events).
    --resume auto: a run found there must have the same resolved config up to RESUME_MAY_CHANGE.
    --resume PATH inside output_dir: continues whatever differs; the differences are returned.
    `act=False` checks only (stage2-launch --dry-run). Raises RunFolderError with the fix.
    """
    out = Path(output_dir)
    traces = run_traces(out)
    if resume == "auto":
        if overwrite:
            raise RunFolderError("--overwrite starts a new run and --resume auto continues one: pass only one")
        return _check_same_config(out, new_config, strict=True) if traces else []
    if resume and out.resolve() in Path(resume).resolve().parents:  # a checkpoint of the run in this folder
        return _check_same_config(out, new_config, strict=False)
    if not traces:
        return []
    if not overwrite:
        raise RunFolderError(f"training.output_dir {out} already holds another run: {'; '.join(traces)}. " + _fix(out))
    if not act:
        return [f"--overwrite: would move {out} aside"]
    notes = [f"--overwrite: moved the previous run {out} → {move_aside(out)}"]
    tb = Path(logging_dir) if logging_dir else None
    if tb and tb.is_dir() and out.resolve() not in tb.resolve().parents and any(tb.glob("events.out.tfevents.*")):
        notes.append(f"--overwrite: moved its TensorBoard logs {tb} → {move_aside(tb)}")
    return notes


def _check_same_config(out: Path, new_config: Mapping, strict: bool) -> list[str]:
    old = read_resolved(out)
    if old is None:
        return [f"{out / RESOLVED_CONFIG} is missing: cannot check that the run being resumed had this config"]
    diffs = config_differences(old, new_config)
    # A key the old file lacks is one a newer toolkit added (with its default): noted, not refused.
    bad = [d for d in diffs if strict and not _may_change(d[0]) and type(d[1]) is not object]
    if bad:
        listed = "; ".join(f"{k}: {_show(a)} → {_show(b)}" for k, a, b in bad)
        raise RunFolderError(
            f"--resume auto: the run in {out} was trained with a different config ({listed}). fix: resume with "
            f"the profile and --set values it was started with, or start a new run (another "
            f"training.output_dir, or --overwrite to move this one aside); `--resume <checkpoint dir>` "
            f"continues from a checkpoint whatever differs."
        )
    return [f"resume: {k} changed {_show(a)} → {_show(b)}" for k, a, b in diffs]
