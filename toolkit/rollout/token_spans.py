"""Token spans of a target's answer: where each token's piece starts and ends, which tokens overlap a character
span, and painting values over token ranges. The arithmetic under targets.py's supervision rules (its module
docstring has them); pure Python, the per-token work in C (`accumulate`, `map`, `compress`).
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Sequence
from itertools import accumulate, compress, count


def token_bounds(pieces: Sequence[str], at: int = 0) -> tuple[list[int], list[int]]:
    """Where each piece starts and ends, the first starting at `at`."""
    bounds = list(accumulate(map(len, pieces), initial=at))
    return bounds[:-1], bounds[1:]


def span_lists(starts: list[int], ends: list[int]) -> tuple[list[int], list[int]]:
    """Token starts and span ends of pieces' starts and ends: a token spans its own characters, an empty piece the
    one character after it (targets.py's module docstring). Both never decrease along the tokens. The per-token
    rule runs only when a piece is empty (rare: a partial UTF-8 byte)."""
    if any(map(operator.eq, starts, ends)):
        ends = [e if e > s else s + 1 for s, e in zip(starts, ends)]
    return starts, ends


def coord_positions(ids: list[int], codec, lo: int = 0) -> list[int]:
    """Positions y >= lo of the coord tokens of ids, found in C (`map(dict.__contains__)`), not token by token."""
    return list(compress(count(lo), map(codec.coord_bin_of.__contains__, ids[lo:])))


def token_ranges(starts: list[int], ends: list[int], spans, lo: int = 0) -> list[tuple[int, int]]:
    """Per character span [a, b), the tokens (from `lo` on) that overlap it: end > a and start < b. Token starts
    and ends never decrease (`span_lists`), so those tokens are one contiguous range [first, stop)."""
    return [(max(bisect.bisect_right(ends, a), lo), bisect.bisect_left(starts, b)) for a, b in spans]


def paint(out: list, ranges, value, offset: int = 0) -> None:
    """out[a - offset : b - offset] = value for each token range [a, b)."""
    for a, b in ranges:
        if b > a:
            out[a - offset : b - offset] = [value] * (b - a)
