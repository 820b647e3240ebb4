"""Decode microbatching: how a rank's requests are cut into generation calls. Imports nothing heavy.

`decode_batch_size` is the one knob (docs/VLLM.md, Per-rank chunk): no rollout engine decodes more than that many
sequences per call. Server-mode chunk arithmetic (per-rank chunk from server world sizes) lives here too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

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
    """The per-step sampling seed shared by every backend."""
    return (seed + step * 1000003) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------------
# Server mode: S = Σ server world sizes (DP×TP each), W = learner world size.


def per_rank_chunk(decode_batch_size: int, server_world_sizes: Sequence[int], learner_world_size: int) -> int:
    """Requests one learner rank sends per synchronized round: max(1, ⌊decode_batch_size·S / W⌋).

    Raises ValueError (naming every factor) unless decode_batch_size·S ≥ W, i.e. unless every
    learner rank can get a request without some rollout GPU decoding more than decode_batch_size.

    >>> per_rank_chunk(4, [6], 2)      # 6 server GPUs, 2 learners: 24 per round, 12 per rank
    12
    >>> per_rank_chunk(4, [7], 1)      # the default launcher's 7 server GPUs, 1 learner
    28
    >>> per_rank_chunk(1, [2, 1], 3)
    1
    """
    s = sum(int(x) for x in server_world_sizes)
    w = int(learner_world_size)
    if decode_batch_size <= 0 or w <= 0 or not server_world_sizes or min(server_world_sizes) <= 0:
        raise ValueError(
            f"decode_batch_size={decode_batch_size}, server world sizes {list(server_world_sizes)} and "
            f"learner_world_size={w} must all be positive"
        )
    if decode_batch_size * s < w:
        raise ValueError(
            f"decode_batch_size cap is infeasible for the current topology: decode_batch_size={decode_batch_size} "
            f"rollout_world_size={s} learner_world_size={w}. Increase rollout server DP world size, reduce learner "
            "world size, or increase decode_batch_size."
        )
    return max(1, decode_batch_size * s // w)


def _largest_remainder(total: int, weights: Sequence[int], caps: Sequence[int] | None = None) -> list[int]:
    """Split `total` in proportion to `weights`: floors, then +1 by largest remainder (ties: lower index)."""
    wsum = sum(weights)
    if wsum <= 0:
        return [0] * len(weights)
    base = [total * w // wsum for w in weights]
    if caps is not None:
        base = [min(b, c) for b, c in zip(base, caps)]
    order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % wsum), i))
    left = total - sum(base)
    while left > 0:
        moved = False
        for i in order:
            if left and (caps is None or base[i] < caps[i]):
                base[i] += 1
                left -= 1
                moved = True
        if not moved:
            raise ValueError(f"cannot place {total} items within caps {list(caps or [])}")
    return base


def server_caps(
    decode_batch_size: int, server_world_sizes: Sequence[int], learner_world_size: int, rank: int
) -> list[int]:
    """Per-server request caps of learner `rank` for one round; they sum to per_rank_chunk(...).

    The global round budget [0, W·C) is cut into contiguous slices, one per server, weighted by
    server world size (largest remainder); rank r owns [r·C, (r+1)·C) and its cap on a server is the
    overlap with that server's slice.

    >>> server_caps(4, [6], 2, 1)
    [12]
    >>> [server_caps(2, [1, 2], 2, r) for r in range(2)]      # C = 3, slices [0,2) [2,6)
    [[2, 1], [0, 3]]
    """
    c = per_rank_chunk(decode_batch_size, server_world_sizes, learner_world_size)
    if not 0 <= rank < learner_world_size:
        raise ValueError(f"rank {rank} is outside learner_world_size {learner_world_size}")
    slices = _largest_remainder(learner_world_size * c, list(server_world_sizes))
    lo, hi = rank * c, (rank + 1) * c
    caps, start = [], 0
    for size in slices:
        caps.append(max(0, min(hi, start + size) - max(lo, start)))
        start += size
    return caps


def allocate_counts(n: int, caps: Sequence[int]) -> list[int]:
    """Split a round of n ≤ Σcaps requests over servers in proportion to their caps, never above a cap.

    >>> allocate_counts(12, [12])
    [12]
    >>> allocate_counts(3, [2, 4])
    [1, 2]
    >>> allocate_counts(5, [2, 4])
    [2, 3]
    """
    if n < 0 or n > sum(caps):
        raise ValueError(f"cannot send {n} requests within per-server caps {list(caps)} (sum {sum(caps)})")
    return _largest_remainder(n, list(caps), caps)


def split_counts(n: int, parts: int, start: int = 0) -> list[int]:
    """Near-equal contiguous shares of n items over `parts` workers; the extra items go to the workers
    from `start` on (rotate `start` between calls so small batches don't always land on worker 0).

    >>> split_counts(5, 2)
    [3, 2]
    >>> split_counts(1, 3, start=2)
    [0, 0, 1]
    >>> split_counts(4, 3, start=1)
    [1, 2, 1]
    """
    if parts <= 0:
        raise ValueError(f"parts must be > 0, got {parts}")
    base, extra = divmod(n, parts)
    out = [base] * parts
    for k in range(extra):
        out[(start + k) % parts] += 1
    return out
