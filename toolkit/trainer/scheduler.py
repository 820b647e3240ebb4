"""Channel scheduler: which channel (A or B) optimizer step `s` runs.

Owns the Bresenham rule `B iff floor((s+1)·b) > floor(s·b)` and the realized-ratio telemetry. Pure
and deterministic, so a resumed run reproduces the schedule from the step counter alone. Imports
nothing heavy (no torch).

The ratio is taken as the exact rational written in the float's shortest decimal repr (0.05 → 1/20),
so float rounding can never move a B step: b=0.05 gives exactly one B in steps 0..19 (at step 19),
and the first N steps hold exactly floor(N·b) B steps (= round(N·b) when N·b is an integer).
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from functools import lru_cache
from math import floor


@lru_cache(maxsize=64)
def _exact_ratio(b_ratio: float) -> Fraction:
    # repr() is the shortest decimal that round-trips, i.e. what the user wrote in YAML.
    return Fraction(repr(float(b_ratio)))


def channel_for_step(step: int, b_ratio: float) -> str:
    """Return "B" iff floor((step+1)·b) > floor(step·b), else "A"; b ≤ 0 → always A, b ≥ 1 → always B.

    Raises:
        ValueError: for a negative step or a non-finite ratio.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    b = float(b_ratio)
    if b != b or b in (float("inf"), float("-inf")):
        raise ValueError(f"b_ratio must be a finite float in [0, 1], got {b_ratio!r}")
    if b <= 0.0:
        return "A"
    if b >= 1.0:
        return "B"
    exact = _exact_ratio(b)
    return "B" if floor((step + 1) * exact) > floor(step * exact) else "A"


def realized_b_ratio(steps: Iterable[str]) -> float:
    """Fraction of Channel-B steps in a sequence of executed channels ("A"/"B"), counting each step once.

    Returns 0.0 for an empty sequence.
    """
    n = n_b = 0
    for channel in steps:
        if channel not in ("A", "B"):
            raise ValueError(f"channel must be 'A' or 'B', got {channel!r}")
        n += 1
        n_b += channel == "B"
    return n_b / n if n else 0.0
