"""Coordinate tokens: the 1000 bins `<|coord_0|>` … `<|coord_999|>` the detector emits.

Owns the token spelling and the bin <-> [0, 1] mapping (k / 999, never / 1000). Imports nothing heavy.
"""

from __future__ import annotations

import re

NUM_BINS = 1000
MAX_BIN = NUM_BINS - 1
COORD_TOKENS = tuple(f"<|coord_{k}|>" for k in range(NUM_BINS))
_COORD_RE = re.compile(r"<\|coord_([0-9]{1,3})\|>")  # used with fullmatch only
# Regex text of a bin as a coord token writes it (0..999, no leading zero), and of exactly the 1000 coord tokens.
BIN_PATTERN = r"0|[1-9][0-9]{0,2}"
COORD_PATTERN = rf"<\|coord_(?:{BIN_PATTERN})\|>"


def coord_token(k: int) -> str:
    """The token text for bin k (0..999)."""
    if not 0 <= k <= MAX_BIN:
        raise ValueError(f"coordinate bin must be in [0, {MAX_BIN}], got {k}")
    return COORD_TOKENS[k]


def parse_coord_token(text: str) -> int | None:
    """Bin index of a coord-token string, or None if `text` is not exactly one coord token."""
    # fullmatch: `$` would also accept a trailing newline ("<|coord_1|>\n" is a format error, not bin 1).
    m = _COORD_RE.fullmatch(text)
    if m is None:
        return None
    k = int(m.group(1))
    return k if k <= MAX_BIN and str(k) == m.group(1) else None


def bin_to_unit(k: int) -> float:
    """Bin -> normalized coordinate in [0, 1]."""
    return k / MAX_BIN


def pixel_to_bin(v: float, size: int) -> int:
    """Pixel coordinate -> bin, the inverse of `bin_to_unit` scaled by the image side (`size` pixels).

    Bin k stands for the fraction k / 999 of the side, so v pixels is bin round(v / size * 999), clamped to
    0..999 (Python's round: halves go to the even bin). Edges map to the edge bins: 0 -> 0, size -> 999.

    >>> [pixel_to_bin(v, 112) for v in (0, 1, 56, 111.5, 112)]
    [0, 9, 500, 995, 999]
    """
    return min(MAX_BIN, max(0, round(v / size * MAX_BIN)))
