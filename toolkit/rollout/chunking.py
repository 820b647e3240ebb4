"""Decode microbatching: how a rank's requests are cut into generation calls. Imports nothing heavy.

`decode_batch_size` is the one knob (DESIGN §3): no rollout engine decodes more than that many
sequences per call. Server-mode chunk arithmetic (per-rank chunk from server world sizes) lives here too.
"""
from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

T = TypeVar("T")


def chunked(items: Sequence[T], size: int) -> Iterator[tuple[int, Sequence[T]]]:
    """Yield (offset, chunk) pairs of at most `size` items, in order.

    >>> [(o, list(c)) for o, c in chunked([1, 2, 3, 4, 5], 2)]
    [(0, [1, 2]), (2, [3, 4]), (4, [5])]
    """
    if size <= 0:
        raise ValueError(f"decode_batch_size must be > 0, got {size}")
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def seed_base(seed: int, step: int) -> int:
    """The per-step sampling seed shared by every backend (domain.md §3.8)."""
    return (seed + step * 1000003) & 0x7FFFFFFF
