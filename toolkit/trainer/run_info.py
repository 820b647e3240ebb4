"""What a training run records about itself besides its metrics: the provenance written at the top of
resolved_config.yaml, the console's one-line step summary, and the per-step sample-id digest that proves
resume order (toolkit/trainer/loop.py calls all three).
"""

from __future__ import annotations

import zlib
from pathlib import Path

SUMMARY_KEYS = (
    "loss/total",
    "loss/ce",
    "loss/bbox_ciou",
    "rollout/f1",
    "rollout/parse_truncated_rate",
    "eval_rollout/f1",
    "eval_rollout/class50/f1",
    "train/learning_rate",
    "time/step_s",
)


def provenance() -> dict:
    """Tool version and git commit recorded at the top of every run's resolved_config.yaml."""
    import subprocess

    import toolkit

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"tool_version": toolkit.__version__, "git_commit": commit}


def summary(metrics: dict) -> str:
    """The SUMMARY_KEYS present in `metrics`, as `key=value` pairs for the step's console line."""
    return " ".join(f"{k}={metrics[k]:.4g}" for k in SUMMARY_KEYS if k in metrics)


def sample_digest(ids) -> int:
    """A small exact fingerprint of the step's sample ids (summed over ranks) to prove resume order."""
    return zlib.crc32(",".join(ids).encode()) % 1_000_003
