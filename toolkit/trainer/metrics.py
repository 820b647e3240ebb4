"""Step metrics: per-rank accumulation with explicit aggregation rules, one reduction per optimizer step,
and rank-0 output (metrics.jsonl + TensorBoard).

Owns `StepMetrics`, `reduce_metrics` and `MetricsWriter`. Rules, each kept as two numbers (a, b) so ranks and
packs merge exactly:
    sum    a = Σ value                          → a            (counters: objects, drops, tokens)
    mean   a = Σ value·weight, b = Σ weight      → a / b        (losses weighted by segments, lengths)
    max    a = max value                         → a            (times, flags such as repeat_terminate_active)
    ratio  a = Σ num, b = Σ den                  → a / b        (rates recomputed from global counts:
                                                                 parse_truncated_rate, precision, recall, f1)
A mean or ratio whose denominator is 0 reports 0.0 (so callers should not add a rate on a step that has
no events for it, e.g. rollout rates on Channel-A steps).

Distributed: `reduce_metrics` (alias `reduce`) is the only function that talks to other ranks. It makes exactly
one collective, `all_gather_object` of the local {key: (rule, a, b)} dict: the key union across ranks (drop-reason
buckets differ per rank) and every rule's merge come out of that single call, and the payload is a few KB
once per step. Every rank must call it once per step, in the same place, outside any rank-dependent
branch; logging (`MetricsWriter`) never communicates. With NCCL the object is staged on
`torch.cuda.current_device()`, so call `torch.cuda.set_device(local_rank)` first (or pass a gloo group).
Imports torch inside functions only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

RULES = ("sum", "mean", "max", "ratio")


class StepMetrics:
    """Local accumulator for one optimizer step (or one eval pass). Values must be Python numbers
    (convert tensors once, e.g. via `pack_loss`'s parts, not with one .item() per key)."""

    def __init__(self) -> None:
        self._acc: dict[str, list] = {}

    def _add(self, key: str, rule: str, a: float, b: float = 0.0) -> None:
        if rule not in RULES:
            raise ValueError(f"metric rule must be one of {RULES}, got {rule!r}")
        a, b = float(a), float(b)
        entry = self._acc.get(key)
        if entry is None:
            self._acc[key] = [rule, a, b]
            return
        if entry[0] != rule:
            raise ValueError(f"metric {key!r} was added with rule {entry[0]!r}, now with {rule!r}")
        if rule == "max":
            entry[1] = max(entry[1], a)
        else:
            entry[1] += a
            entry[2] += b

    def add_sum(self, key: str, value: float) -> None:
        """Counter: summed over packs and ranks."""
        self._add(key, "sum", value)

    def add_mean(self, key: str, value: float, weight: float = 1.0) -> None:
        """Weighted mean: Σ value·weight / Σ weight over packs and ranks."""
        self._add(key, "mean", float(value) * float(weight), weight)

    def add_max(self, key: str, value: float) -> None:
        """Maximum over packs and ranks (times, flags)."""
        self._add(key, "max", value)

    def count(self, key: str, n: float = 1.0) -> None:
        """Shorthand for add_sum(key, n)."""
        self.add_sum(key, n)

    def time(self, key: str, seconds: float) -> None:
        """Shorthand for add_max(key, seconds): a step's time is its slowest rank's."""
        self.add_max(key, seconds)

    def add_ratio(self, key: str, num: float, den: float) -> None:
        """Rate recomputed from the global sums: Σ num / Σ den."""
        self._add(key, "ratio", num, den)

    def add_means(self, values: Mapping[str, float], weight: float = 1.0) -> None:
        """Add several weighted means at once, e.g. a pack's loss parts weighted by its segment count."""
        for key, value in values.items():
            self.add_mean(key, value, weight)

    def add_detection_counts(self, prefix: str, matched: float, pred: float, gt: float) -> None:
        """Counters `<prefix>/{matched,pred_objects,gt_objects,fp,fn}` and global precision/recall/f1.

        f1 = 2·matched / (pred + gt), which equals 2PR/(P+R) of the global precision and recall.
        """
        self.add_sum(f"{prefix}/matched", matched)
        self.add_sum(f"{prefix}/pred_objects", pred)
        self.add_sum(f"{prefix}/gt_objects", gt)
        self.add_sum(f"{prefix}/fp", pred - matched)
        self.add_sum(f"{prefix}/fn", gt - matched)
        self.add_ratio(f"{prefix}/precision", matched, pred)
        self.add_ratio(f"{prefix}/recall", matched, gt)
        self.add_ratio(f"{prefix}/f1", 2 * matched, pred + gt)

    def merge(self, other: StepMetrics) -> None:
        """Fold another accumulator into this one (same rules as adding)."""
        for key, (rule, a, b) in other.state().items():
            self._add(key, rule, a, b)

    def state(self) -> dict[str, tuple[str, float, float]]:
        """The raw (rule, a, b) per key: what crosses ranks."""
        return {k: (v[0], v[1], v[2]) for k, v in self._acc.items()}

    @classmethod
    def from_states(cls, states: Iterable[Mapping[str, tuple[str, float, float]]]) -> StepMetrics:
        """Merge raw states (one per rank, in rank order)."""
        merged = cls()
        for state in states:
            for key, (rule, a, b) in state.items():
                merged._add(key, rule, a, b)
        return merged

    def finalize(self) -> dict[str, float]:
        """Final values by rule, keys sorted (no communication)."""
        out = {}
        for key in sorted(self._acc):
            rule, a, b = self._acc[key]
            if rule in ("sum", "max"):
                out[key] = a
            else:
                out[key] = a / b if b != 0 else 0.0
        return out

    def __contains__(self, key: str) -> bool:
        return key in self._acc

    def __len__(self) -> int:
        return len(self._acc)


def reduce_metrics(metrics: StepMetrics, group: Any = None) -> dict[str, float]:
    """Step-level values over all ranks of `group` (one `all_gather_object`; none when not distributed).

    Every rank gets the same dict. Raises ValueError on every rank if ranks used different rules for a key.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return metrics.finalize()
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, metrics.state(), group=group)  # the step's only metrics collective
    return StepMetrics.from_states(gathered).finalize()


reduce = reduce_metrics  # the name used in the design brief


def _json_value(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _truncate_jsonl(path: str, resume_step: int) -> None:
    """Keep only the records of steps ≤ `resume_step`, the steps the resumed checkpoint has (atomic rewrite)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class MetricsWriter:
    """Rank-0 writer of `<output_dir>/metrics.jsonl` (appended; one line per optimizer step) and TensorBoard
    scalars under `logging_dir` (by default `<output_dir>/tb`). Other ranks hold no files and write nothing.
    Each `write` flushes both, so a crash loses no step already written. Never communicates: pass it
    `reduce_metrics(...)`'s result. `step` is the number of optimizer steps completed (1 for the first
    step), the same number the console, checkpoints and signal messages use."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        logging_dir: str | os.PathLike,
        rank: int,
        sinks: Iterable[str] = ("jsonl", "tensorboard"),
        resume_step: int | None = None,
    ) -> None:
        """`sinks` ⊆ {"jsonl", "tensorboard"} (training.report_to). `resume_step`: the steps completed by the
        checkpoint resumed from; jsonl records and TensorBoard points of later steps are dropped first, so a
        run resumed from an older checkpoint does not log those steps twice."""
        from toolkit.runlayout import METRICS

        self.rank = rank
        self.path = os.path.join(os.fspath(output_dir), METRICS)
        self._file = None
        self._tb = None
        self._open = False
        if rank == 0:
            os.makedirs(output_dir, exist_ok=True)
            self._open = True
            if "jsonl" in sinks:
                if resume_step is not None:
                    _truncate_jsonl(self.path, resume_step)
                self._file = open(self.path, "a", encoding="utf-8")
            if "tensorboard" in sinks:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides the events of steps after the checkpoint (written before a crash or stop).
                purge = resume_step + 1 if resume_step else None
                self._tb = SummaryWriter(log_dir=os.fspath(logging_dir), purge_step=purge)

    def write(self, step: int, channel: str, values: Mapping[str, float]) -> None:
        """Append one record {"step", "channel", **values}; non-finite values become null in JSON."""
        if self.rank != 0:
            return
        if not self._open:
            raise RuntimeError("MetricsWriter.write after close()")
        clash = {"step", "channel"} & set(values)
        if clash:
            raise ValueError(f"metric keys {sorted(clash)} clash with the record's own fields")
        record = {"step": int(step), "channel": channel, **{k: _json_value(v) for k, v in values.items()}}
        if self._file is not None:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, float(value), global_step=int(step))
            self._tb.flush()

    def close(self) -> None:
        self._open = False
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
