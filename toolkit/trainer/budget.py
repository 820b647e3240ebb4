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
    n_records: int
    effective_batch_size: int
    per_device_batch_size: int
    world_size: int
    rank: int
    seed: int
    shuffle: bool = True

    def __post_init__(self) -> None:
        pw = self.per_device_batch_size * self.world_size
        if self.effective_batch_size % pw:
            raise ValueError(
                f"effective_batch_size={self.effective_batch_size} is not divisible by "
                f"per_device_train_batch_size={self.per_device_batch_size} x world_size={self.world_size}"
            )
        if self.n_records < self.effective_batch_size:
            raise ValueError(
                f"the training set has {self.n_records} records, fewer than one step's "
                f"effective_batch_size={self.effective_batch_size}: lower effective_batch_size or add data"
            )

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.effective_batch_size // (self.per_device_batch_size * self.world_size)

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
