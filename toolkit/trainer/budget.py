"""The step budget: which raw samples each rank takes for each optimizer step. Imports nothing heavy.

Per optimizer step the job consumes `effective_batch_size` (E) raw samples; each of the W learner
ranks takes E / W of them as `per_device_train_batch_size` (P) samples per micro-step over the derived
GAS = E / (P·W) micro-steps. The trainer buffers all micro-steps and executes them on the last one.

Sample order is a pure function of (seed, step): epoch e is a permutation seeded by seed + e, cut into
windows of E; micro-step m of a window hands rank r the slice [(m·W + r)·P, (m·W + r + 1)·P) — the
DistributedSampler interleave. The tail of an epoch shorter than E is dropped (never a short step),
so resuming at step s needs nothing but s.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class StepBudget:
    """This rank's share of every optimizer step. GAS and E / W come from `cfg.derived` (config/normalize.py
    `derive`, the one place that checks E % (P·W)); nothing here re-derives them."""

    n_records: int
    gradient_accumulation_steps: int
    per_rank_samples: int  # E / W
    world_size: int
    rank: int
    seed: int
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.n_records < self.effective_batch_size:
            raise ValueError(
                f"the training set has {self.n_records} records, fewer than one step's "
                f"effective_batch_size={self.effective_batch_size}: lower effective_batch_size or add data"
            )

    @classmethod
    def from_config(cls, cfg, n_records: int, world_size: int, rank: int) -> StepBudget:
        """The budget of a profile resolved for this run's world size (toolkit/train.py resolves it with
        WORLD_SIZE); a config resolved for another learner count is refused, never re-derived."""
        d = cfg.derived
        if world_size != d.learner_world_size:
            raise ValueError(
                f"the profile was resolved for learner_world_size={d.learner_world_size}, but this run has "
                f"{world_size} learner ranks: resolve it with world_size={world_size} "
                f"(load_profile(..., world_size=...); `stage2 train` reads WORLD_SIZE)"
            )
        return cls(
            n_records,
            d.gradient_accumulation_steps,
            d.per_rank_samples_per_step,
            world_size,
            rank,
            cfg.training.seed,
            cfg.data.shuffle,
        )

    @property
    def per_device_batch_size(self) -> int:
        """P = (E / W) / GAS."""
        return self.per_rank_samples // self.gradient_accumulation_steps

    @property
    def effective_batch_size(self) -> int:
        """E = (E / W) · W."""
        return self.per_rank_samples * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n_records // self.effective_batch_size

    def total_steps(self, num_train_epochs: float, max_steps: int) -> int:
        if max_steps > 0:
            return max_steps
        return max(1, int(num_train_epochs * self.steps_per_epoch))

    def micro_batches(self, step: int) -> list[list[int]]:
        """GAS lists of P record indices: this rank's share of optimizer step `step`."""
        epoch, window = divmod(step, self.steps_per_epoch)
        order = _epoch_order(self.n_records, self.seed + epoch, self.shuffle)
        base = window * self.effective_batch_size
        p, w = self.per_device_batch_size, self.world_size
        return [
            list(order[base + (m * w + self.rank) * p : base + (m * w + self.rank + 1) * p])
            for m in range(self.gradient_accumulation_steps)
        ]

    def step_indices(self, step: int) -> list[int]:
        return [i for mb in self.micro_batches(step) for i in mb]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, shuffle: bool) -> tuple[int, ...]:
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    return tuple(order)
