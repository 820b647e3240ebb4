"""Coordinate tokens: the 1000 bins `<|coord_0|>` … `<|coord_999|>` the detector emits.

Owns the token spelling and the bin <-> [0, 1] mapping (k / 999, never / 1000). Imports nothing heavy.
"""
from __future__ import annotations

import re

NUM_BINS = 1000
MAX_BIN = NUM_BINS - 1
COORD_TOKENS = tuple(f"<|coord_{k}|>" for k in range(NUM_BINS))
_COORD_RE = re.compile(r"^<\|coord_(\d{1,3})\|>$")


def coord_token(k: int) -> str:
    """The token text for bin k (0..999)."""
    if not 0 <= k <= MAX_BIN:
        raise ValueError(f"coordinate bin must be in [0, {MAX_BIN}], got {k}")
    return COORD_TOKENS[k]


def parse_coord_token(text: str) -> int | None:
    """Bin index of a coord-token string, or None if `text` is not exactly one coord token."""
    m = _COORD_RE.match(text)
    if m is None:
        return None
    k = int(m.group(1))
    return k if k <= MAX_BIN and str(k) == m.group(1) else None


def bin_to_unit(k: int) -> float:
    """Bin -> normalized coordinate in [0, 1]."""
    return k / MAX_BIN
