"""DeepSpeed engine configs by name: ds_configs/<name>.json.

The JSON files hold engine settings only (zero_optimization and friends). The trainer injects the
batch fields (`train_micro_batch_size_per_gpu`, `gradient_accumulation_steps: 1`), precision
(`bf16.enabled` from model.torch_dtype) and `gradient_clipping` (training.max_grad_norm), so those
keys — and optimizer/scheduler, which the trainer builds for its parameter groups — are refused here.
Imports stdlib only.
"""

from __future__ import annotations

import json
from pathlib import Path

from toolkit.config.errors import ConfigError, Issue, Location

DS_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
INJECTED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
)


def ds_config_names() -> list[str]:
    """Available config names (file stems in ds_configs/), sorted."""
    return sorted(p.stem for p in DS_DIR.glob("*.json"))


def ds_config_path(name: str) -> Path:
    """ds_configs/<name>.json; raises ConfigError listing the available names when unknown."""
    path = DS_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(
            [
                Issue.at(
                    Location(str(DS_DIR)),
                    "deepspeed.config",
                    f"unknown DeepSpeed config '{name}'",
                    "use one of: " + ", ".join(ds_config_names()),
                )
            ]
        )
    return path


def load_ds_config(name: str) -> dict:
    """The engine settings of a named config (a fresh dict the trainer may extend)."""
    path = ds_config_path(name)
    data = json.loads(path.read_text(encoding="utf-8"))
    bad = [k for k in INJECTED_KEYS if k in data]
    if not isinstance(data, dict) or bad:
        raise ConfigError(
            [
                Issue.at(
                    Location(str(path)),
                    "deepspeed.config",
                    f"{path.name} sets trainer-injected keys {bad}",
                    "remove them; the trainer derives them from the profile",
                )
            ]
        )
    return data
