"""Checkpoint layout, resume discovery, rotation and RNG state. Torch is imported inside functions.

    <output_dir>/checkpoints/step-000040/
        ds/                   DeepSpeed checkpoint (model, optimizer, scheduler; every rank writes its part)
        rng/rank0.pt …        Python / NumPy / torch RNG states of each rank
        hf/                   `save_pretrained` export + tokenizer (loads with from_pretrained)
        trainer_state.json    written LAST by rank 0: the checkpoint is complete iff this file exists

`step` in trainer_state is the next optimizer step to run; the data cursor and the A/B schedule are
pure functions of it (budget.py, scheduler.py), so it is all a resume needs besides the engine state.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    metric_name: str = "rollout/f1"
    schedule_b_ratio: float = 0.0
    b_steps: int = 0
    history: list = field(default_factory=list)  # [(step, metric)] of evaluated checkpoints

    def improved(self, value: float, greater_is_better: bool = True) -> bool:
        if self.best_metric is None:
            return True
        return value > self.best_metric if greater_is_better else value < self.best_metric


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def find_resume_dir(output_dir: str | Path, resume: str | None) -> Path | None:
    """`auto` → newest complete checkpoint or None; a path → that checkpoint (must be complete)."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: no {STATE_FILE} there, so it is not a complete checkpoint "
            f"(fix: pass a directory like {checkpoint_dir(output_dir, 40)} or use --resume auto)"
        )
    return path


def write_state(ckpt: Path, state: TrainerState) -> None:
    """Atomically mark a checkpoint complete (rank 0, after every rank has written its part)."""
    tmp = ckpt / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    os.replace(tmp, ckpt / STATE_FILE)


def read_state(ckpt: Path) -> TrainerState:
    return TrainerState(**json.loads((ckpt / STATE_FILE).read_text()))


def save_rng(ckpt: Path, rank: int) -> None:
    import numpy as np
    import torch

    (ckpt / "rng").mkdir(parents=True, exist_ok=True)
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(state, ckpt / "rng" / f"rank{rank}.pt")


def load_rng(ckpt: Path, rank: int) -> None:
    import numpy as np
    import torch

    state = torch.load(ckpt / "rng" / f"rank{rank}.pt", weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def rotate(output_dir: str | Path, keep: int | None, protect: set[Path]) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep`, never one in `protect` (the best)."""
    if not keep:
        return []
    found = complete_checkpoints(output_dir)
    doomed = [p for p in found[: max(0, len(found) - keep)] if p not in protect]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed old checkpoint %s (save_total_limit=%d)", p, keep)
    return doomed
