"""Checkpoint contents, resume discovery, rotation and RNG state. Torch is imported inside functions.
Paths come from toolkit/runlayout.py (the run folder's one layout).

    <output_dir>/checkpoints/step-000040/       the state after 40 optimizer steps
        ds/                   DeepSpeed checkpoint (model, optimizer, scheduler; every rank writes its part)
        rng/rank0.pt …        Python / NumPy / torch RNG states of each rank
        hf/                   `save_pretrained` export + tokenizer (loads with from_pretrained)
        trainer_state.json    written LAST by rank 0: the checkpoint is complete iff this file exists

`step` in trainer_state is the number of optimizer steps completed (= the index of the next step to
run); the data cursor and the A/B schedule are pure functions of it (budget.py, scheduler.py), so it is all
a resume needs besides the engine state. `run_id` names the run that wrote the checkpoint: rotation only
ever removes checkpoints of the current run.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolkit.runlayout import STATE_FILE, checkpoint_dir, checkpoint_run_id, complete_checkpoints  # noqa: F401

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class TrainerState:
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    metric_name: str = "rollout/f1"
    schedule_b_ratio: float = 0.0
    b_steps: int = 0
    history: list = field(default_factory=list)  # [(step, metric)] of evaluated checkpoints
    run_id: str = field(default_factory=new_run_id)  # the run that wrote it (kept across resumes)

    def improved(self, value: float, greater_is_better: bool = True) -> bool:
        if self.best_metric is None:
            return True
        return value > self.best_metric if greater_is_better else value < self.best_metric


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
    """A checkpoint written before run ids existed gets a fresh one (its own older files stay untouched)."""
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


def rotate(output_dir: str | Path, keep: int | None, protect: set[Path], run_id: str) -> list[Path]:
    """Delete the oldest complete checkpoints of run `run_id` beyond `keep`, never one in `protect` (the best)
    and never one written by another run."""
    if not keep:
        return []
    found = [p for p in complete_checkpoints(output_dir) if checkpoint_run_id(p) == run_id]
    doomed = [p for p in found[: max(0, len(found) - keep)] if p not in protect]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed old checkpoint %s (save_total_limit=%d)", p, keep)
    return doomed
