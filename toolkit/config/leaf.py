"""Canonical leaf rules: checked on the RAW leaf of `<project>/configs/stage2_ab/{prod,smoke}/*.yaml`.

A canonical leaf extends exactly `../base.yaml` and pins the high-signal knobs itself (even when the
parent has the same value), so reading one file tells what a run does. A leaf that repeats an
inherited value for a key it need not pin gets a warning. Imports stdlib only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.config.errors import WARNING, Issue, Location
from toolkit.config.yamlio import Document, render_path

CANONICAL_PARENT = "../base.yaml"
CANONICAL_GROUPS = ("prod", "smoke")
PINNED: tuple[tuple, ...] = (
    ("model", "model"),
    ("training", "run_name"),
    ("training", "output_dir"),
    ("training", "learning_rate"),
    ("training", "vit_lr"),
    ("training", "aligner_lr"),
    ("training", "effective_batch_size"),
    ("training", "eval_strategy"),
    ("training", "eval_steps"),
    ("training", "save_strategy"),
    ("training", "save_steps"),
    ("stage2_ab", "schedule", "b_ratio"),
    ("stage2_ab", "n_softctx_iter"),
    ("rollout_matching", "rollout_backend"),
)
PINNED_WHEN_VLLM: tuple[tuple, ...] = (("rollout_matching", "vllm", "mode"),)


def is_canonical_leaf(path: Path) -> bool:
    """True for `.../configs/stage2_ab/{prod,smoke}/<name>.yaml` (any project, temp copies included)."""
    p = Path(path)
    return (
        p.suffix == ".yaml"
        and p.parent.name in CANONICAL_GROUPS
        and p.parent.parent.name == "stage2_ab"
        and p.parent.parent.parent.name == "configs"
    )


def _has(data: Any, path: tuple) -> bool:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _get(data: Any, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data


def _scalar_leaves(data: dict, prefix: tuple = ()):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _scalar_leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def check_leaf(leaf: Document, parent: dict | None) -> list[Issue]:
    """Leaf rules on the raw leaf; `parent` (the parents merged, None when they did not load) feeds
    the repeated-value warning. The leaf's own rollout_backend decides whether vllm.mode is pinned."""
    issues = []
    top = Location(leaf.file, 1, 1)
    if leaf.extends != CANONICAL_PARENT:
        shown = "nothing" if leaf.extends is None else repr(leaf.extends)
        issues.append(
            Issue.at(
                leaf.where(("extends",)) if leaf.extends is not None else top,
                "extends",
                f"a canonical profile extends exactly one parent '{CANONICAL_PARENT}', got {shown}",
                f"write `extends: {CANONICAL_PARENT}` and inline any other overrides",
            )
        )
    backend = ("rollout_matching", "rollout_backend")
    vllm = _has(leaf.data, backend) and _get(leaf.data, backend) == "vllm"
    pinned = PINNED + PINNED_WHEN_VLLM if vllm else PINNED
    missing = [render_path(p) for p in pinned if not _has(leaf.data, p)]
    if missing:
        issues.append(
            Issue.at(
                top,
                ", ".join(missing),
                f"a canonical profile must pin these keys itself (even if the parent sets them): {', '.join(missing)}",
                "add them to this file",
            )
        )
    if parent is not None:
        for path, value in _scalar_leaves(leaf.data):
            if path in pinned or not _has(parent, path) or not _same(_get(parent, path), value):
                continue
            issues.append(
                Issue.at(
                    leaf.where(path),
                    render_path(path),
                    f"repeats the inherited value {value!r}",
                    "remove it (the parent sets it)",
                    WARNING,
                )
            )
    return issues
