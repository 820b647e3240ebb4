"""Checkpoint contents, resume discovery, rotation and RNG state. Torch is imported inside functions.
Paths come from toolkit/runlayout.py (the run folder's one layout).

    <output_dir>/checkpoints/step-000040/       the state after 40 optimizer steps
        ds/                   DeepSpeed checkpoint (model, optimizer, scheduler; every rank writes its part)
        rng/rank0.pt …        Python / NumPy / torch RNG states of each rank (plain values and tensors:
                              read with torch.load(weights_only=True), so a planted pickle is refused)
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

from toolkit.runlayout import STATE_FILE, checkpoint_dir, checkpoint_run_id, complete_checkpoints, rng_file

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


class CheckpointError(ValueError):
    """A checkpoint file this toolkit refuses to load (not written by it, damaged, or tampered with)."""


# Written by earlier versions (a copy of stage2_ab.schedule.b_ratio, never read back): ignored on resume.
RETIRED_STATE_KEY = "schedule_b_ratio"


@dataclass
class TrainerState:
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    metric_name: str = "rollout/f1"
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
    """The trainer state (JSON: data only). Raises CheckpointError naming the file when it is not one.
    A checkpoint written before run ids existed gets a fresh one (its own older files stay untouched)."""
    path = ckpt / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data.pop(RETIRED_STATE_KEY, None)
        return TrainerState(**data)
    except (ValueError, TypeError) as exc:  # bad JSON / bytes, or keys TrainerState does not have
        raise CheckpointError(
            f"{path}: not a trainer state written by this toolkit: {exc} (fix: resume from another checkpoint)"
        ) from None


RNG_FORMAT = 1  # rng/rank<N>.pt layout; see save_rng


def save_rng(ckpt: Path, rank: int) -> None:
    """Write this rank's RNG states as plain values and tensors only, so load_rng can read them with
    `torch.load(weights_only=True)`: no pickled Python objects, hence no code can run on resume."""
    import numpy as np
    import torch

    path = rng_file(ckpt, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "format": RNG_FORMAT,
        "python": random.getstate(),  # (version, tuple of 625 ints, None or float)
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    torch.save(state, path)


def read_rng(ckpt: Path, rank: int) -> dict:
    """This rank's RNG states, loaded weights-only. Raises CheckpointError naming the file when it holds
    anything but the plain values save_rng writes (a planted pickle is refused before it can run)."""
    import pickle

    import torch

    path = rng_file(ckpt, rank)
    fix = (
        "resume only from checkpoints this toolkit wrote; delete the checkpoint or point --resume at "
        "another one (see docs/STAGE2_RUNBOOK.md, Security model)"
    )
    if not path.is_file():
        raise CheckpointError(f"{path}: RNG state missing (fix: {fix})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused: not a weights-only RNG file written by this toolkit "
            f"(an older layout, damaged, or tampered with): {first} (fix: {fix})"
        ) from None
    if not _rng_layout_ok(state):
        raise CheckpointError(
            f"{path}: refused: unexpected contents for an RNG state file (format {RNG_FORMAT} expected) (fix: {fix})"
        )
    return state


def _rng_layout_ok(state) -> bool:
    import torch

    if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
        return False
    py, npy, tch = state.get("python"), state.get("numpy"), state.get("torch")
    return (
        isinstance(py, tuple)
        and len(py) == 3
        and isinstance(py[1], tuple)
        and isinstance(npy, tuple)
        and len(npy) == 5
        and isinstance(npy[0], str)
        and isinstance(npy[1], torch.Tensor)
        and isinstance(tch, torch.Tensor)
        and tch.dtype == torch.uint8
    )


def set_rng(state: dict) -> None:
    """Restore the states read by read_rng."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def load_rng(ckpt: Path, rank: int) -> None:
    """read_rng + set_rng."""
    set_rng(read_rng(ckpt, rank))


# The only classes DeepSpeed 0.19 pickles into its checkpoint files for the ZeRO stages and dtypes
# this toolkit runs (found with torch.serialization.get_unsafe_globals_in_checkpoint on real saves;
# tests/trainer/test_checkpoint_safety.py re-checks them). Tensors, dicts, lists, numbers and strings
# need no entry: torch's weights-only list covers them.
DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


def check_deepspeed_files(ds_dir: Path) -> None:
    """Refuse DeepSpeed checkpoint files that name any Python global beyond DEEPSPEED_GLOBALS.

    DeepSpeed's own loader calls `torch.load(weights_only=False)`, which runs whatever a pickle names;
    this scan reads the pickles' opcodes without running them, so a planted `os.system` (or any other
    function or class) is refused before DeepSpeed sees the file. Raises CheckpointError naming the file.
    """
    from torch.serialization import get_unsafe_globals_in_checkpoint

    fix = "resume only from checkpoints this toolkit wrote; see docs/STAGE2_RUNBOOK.md, Security model"
    for path in sorted(Path(ds_dir).rglob("*.pt")):
        try:
            named = set(get_unsafe_globals_in_checkpoint(path))
        except Exception as exc:  # noqa: BLE001 - any failure to read the archive means: do not load it
            raise CheckpointError(f"{path}: refused: not a torch checkpoint archive ({exc}) (fix: {fix})") from None
        unknown = sorted(named - DEEPSPEED_GLOBALS)
        if unknown:
            raise CheckpointError(
                f"{path}: refused: it names Python objects a DeepSpeed checkpoint never holds "
                f"({', '.join(unknown)}); loading it could run code (fix: {fix})"
            )


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
