"""The checks of what the target builders are given: GT objects and a match that fits the parse.

A failure here is a caller bug (invalid GT, a match for another parse), so it raises ValueError naming the
sample; a rollout that cannot be trained is not an error (targets.py gives a `Drop`).
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Mapping, Sequence
from itertools import chain, repeat

from toolkit.data.coords import MAX_BIN
from toolkit.rollout.match import MatchResult


def check_gt(gt_objects: Sequence[Mapping], sample_id: str) -> None:
    if _plain_gt_ok(gt_objects):
        return
    for n, o in enumerate(gt_objects):
        b = o.get("bbox_2d") if type(o) is dict or isinstance(o, Mapping) else None  # dict: without the ABC check
        ok = (
            isinstance(b, (list, tuple))
            and len(b) == 4
            and _all_bins(b)
            and b[0] <= b[2]
            and b[1] <= b[3]
            and isinstance(o.get("desc"), str)
        )
        if not ok:
            raise ValueError(
                f"sample {sample_id!r}: GT object {n} must be {{'desc': str, 'bbox_2d': [x1, y1, x2, y2]}} "
                f"with int bins in [0, {MAX_BIN}], x1 <= x2, y1 <= y2; got {o!r}"
            )


def _plain_gt_ok(gt_objects: Sequence[Mapping]) -> bool:
    """True when every object passes `check_gt` as the common case: a dict, a str desc, a list or tuple of 4 plain
    ints in [0, MAX_BIN] with x1 <= x2 and y1 <= y2. A few C-level passes over all objects instead of a dozen
    Python steps per object (docs/PERFORMANCE.md); False sends any other input to the per-object check."""
    if not {*map(type, gt_objects)} <= {dict}:
        return False
    boxes = list(map(dict.get, gt_objects, repeat("bbox_2d")))
    if not {*map(type, boxes)} <= {list, tuple} or not {*map(len, boxes)} <= {4}:
        return False
    flat = list(chain.from_iterable(boxes))
    return (
        {*map(type, flat)} <= {int}
        and {*map(type, map(dict.get, gt_objects, repeat("desc")))} <= {str}
        and (not flat or (min(flat) >= 0 and max(flat) <= MAX_BIN))
        and all(map(operator.le, flat[0::4], flat[2::4]))
        and all(map(operator.le, flat[1::4], flat[3::4]))
    )


def _all_bins(b) -> bool:
    if {*map(type, b)} == {int}:  # the common case (plain ints), without a call per value
        return min(b) >= 0 and max(b) <= MAX_BIN
    return all(map(_is_bin, b))


def _is_bin(v) -> bool:
    if type(v) is int:  # the common case, without the slower ABC check below
        return 0 <= v <= MAX_BIN
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v <= MAX_BIN


def check_match(match: MatchResult, n_pred: int, n_gt: int, sample_id: str) -> None:
    preds = [i for i, _, _ in match.pairs] + list(match.fp_indices)
    gts = [j for _, j, _ in match.pairs] + list(match.fn_indices)
    if sorted(preds) != list(range(n_pred)) or sorted(gts) != list(range(n_gt)):
        raise ValueError(
            f"sample {sample_id!r}: match does not partition {n_pred} parsed objects and {n_gt} GT objects"
        )
