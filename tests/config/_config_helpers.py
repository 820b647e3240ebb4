"""Helpers for config tests: a minimal flat profile, file writing, error lookup."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from toolkit.config import ConfigError, load_profile

REPO = Path(__file__).resolve().parents[2]

# A complete, non-canonical profile (no extends): the smallest thing that loads.
MINIMAL = """\
model:
  model: some-org/some-model
data:
  train_jsonl: data/train.jsonl
  val_jsonl: data/val.jsonl
training:
  run_name: t
  output_dir: out
  logging_dir: tb
  learning_rate: 1.0e-5
  effective_batch_size: 8
deepspeed:
  enabled: false
global_max_length: 1024
stage2_ab:
  schedule:
    b_ratio: 0.5
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_errors(path: Path, overrides=(), world_size=1) -> ConfigError:
    """The ConfigError a profile must raise (fails the test when it loads)."""
    with pytest.raises(ConfigError) as info:
        load_profile(path, overrides, world_size=world_size)
    return info.value


def by_path(err: ConfigError) -> dict:
    """key_path → list of issues."""
    out: dict = {}
    for issue in err.issues:
        out.setdefault(issue.key_path, []).append(issue)
    return out
