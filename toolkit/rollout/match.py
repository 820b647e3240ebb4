"""Hungarian matching of predicted boxes to ground truth with a mask-IoU gate.

Owns box IoU, the polygon ("mask") IoU of boxes on the virtual canvas, candidate selection, the
dummy-augmented assignment and detection counts (precision/recall/F1). numpy + scipy.

Mask IoU is the predecessor's, pycocotools' (the reference the tests compare with, bit for bit): each box drawn
by pycocotools' polygon filler as the quad (x1,y1)-(x2,y1)-(x2,y2)-(x1,y2) on an R×R canvas, with coordinates
clamped to 0..999 and scaled by (R−1)/999 (1/999 when R = 1), and the IoU of the two run-length masks as
pycocotools' `iou` computes it. The filler draws such a quad as a pixel rectangle, which `_pixel_rects` computes
in closed form, so no mask is drawn (docs/PERFORMANCE.md). A box
thinner than the polygon filler's resolution has an empty mask, so its IoU with anything (itself
included) is 0: degenerate predictions are never matched (docs/METRICS_LOSSES.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from toolkit.data.coords import MAX_BIN

FORBIDDEN = 1e6  # cost of a gated or non-candidate pair; far above fp_cost + fn_cost


@dataclass(frozen=True)
class MatchResult:
    """pairs: (pred_index, gt_index, mask_iou), sorted by pred index; fp/fn: unmatched indices, ascending."""

    pairs: list[tuple[int, int, float]]
    fp_indices: list[int]
    fn_indices: list[int]
    gating_rejections: int

    @property
    def iou_sum(self) -> float:
        return float(sum(p[2] for p in self.pairs))


def _as_boxes(boxes: Sequence[Sequence[float]]) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.int64).reshape(-1, 4) if len(boxes) else np.zeros((0, 4), np.int64)
    return arr


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes in bin units; 0 when the union has no area."""
    return float(box_iou_matrix([a], [b])[0, 0])


def box_iou_matrix(preds: Sequence[Sequence[float]], gts: Sequence[Sequence[float]]) -> np.ndarray:
    """P×G continuous box IoU (zero-area unions give 0)."""
    p = np.asarray(preds, dtype=np.float64).reshape(-1, 4)
    return _rect_iou(p, np.asarray(gts, dtype=np.float64).reshape(-1, 4))


def _rect_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P×G IoU of the float64 rectangles a (…×P×4) and b (…×G×4), (x1, y1, x2, y2); 0 where the union has no area.
    Few numpy calls (`np.maximum`, not `np.clip`; no errstate: the division never sees a zero; box and mask IoU
    stacked in one call): on the ~40×40 blocks of a sample numpy's per-call overhead is most of the cost
    (docs/PERFORMANCE.md)."""
    ax1, ay1, ax2, ay2 = (a[..., k, None] for k in range(4))
    bx1, by1, bx2, by2 = (b[..., None, :, k] for k in range(4))
    inter = np.maximum(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0.0)  # the width, then times the height
    inter *= np.maximum(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0.0)
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _pixel_rects(boxes: np.ndarray, resolution: int) -> np.ndarray:
    """N×4 pixel rectangles [c0, c1) × [r0, r1) that pycocotools' polygon filler draws for the boxes' quads on the
    R×R canvas, in closed form (the filler's own rule, exact: tests compare with pycocotools).

    The filler rounds every vertex to a 5× grid, X = (int)(5x + .5); along the quad's horizontal edges it
    marks column c where the grid crosses 5c + 2, i.e. X1 ≤ 5c + 2 ≤ X2 − 1, and fills each such column from row
    ceil((Y1 − 2) / 5) up to ceil((Y2 − 2) / 5). (Its clipping to the canvas never binds: 0 ≤ X, Y ≤ 5R − 5.)
    So every edge is ceil((V − 2) / 5) of its low or high grid vertex: c1 = floor((X2 − 3) / 5) + 1 is the same
    number, and c1 ≥ c0, r1 ≥ r0 as the ceiling is monotone; x and y are computed in one call each step."""
    v = np.minimum(np.maximum(boxes, 0), MAX_BIN) * (max(resolution - 1, 1) / MAX_BIN)
    g = np.floor(5 * v + 0.5).astype(np.int64)  # (int)(scale * x + .5) of non-negative x
    lo_hi = np.concatenate([np.minimum(g[:, :2], g[:, 2:]), np.maximum(g[:, :2], g[:, 2:])], axis=1)
    return (-((2 - lo_hi) // 5)).astype(np.float64)  # ceil((V - 2) / 5): [c0, r0, c1, r1]


def mask_iou_matrix(preds: Sequence[Sequence[int]], gts: Sequence[Sequence[int]], resolution: int) -> np.ndarray:
    """P×G pycocotools polygon-mask IoU of the boxes on the virtual R×R canvas: a box's mask is a pixel
    rectangle (`_pixel_rects`), so the IoU is that of the rectangles, inter / union in float64 as pycocotools'
    `iou` divides its pixel counts (0 when the union is empty)."""
    p, g = _as_boxes(preds), _as_boxes(gts)
    if len(p) == 0 or len(g) == 0:
        return np.zeros((len(p), len(g)))
    rects = _pixel_rects(np.concatenate([p, g]), resolution)  # row by row: one call for both sides
    return _rect_iou(rects[: len(p)], rects[len(p) :])


def _candidates(
    box_iou: np.ndarray, pb: np.ndarray, gb: np.ndarray, allowed: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per prediction (row), its top-k allowed GT indices by box IoU (ties by index), or by centre distance
    when no allowed IoU is positive → (P×k' column indices, P×k' validity, None when every pair is allowed);
    k' = min(k, G). A row with fewer than k' allowed GTs has its extra entries marked invalid. `allowed`: None
    when every pair is (no desc filter): then the masking calls are skipped, and the centre distances are
    computed only when some row has no positive IoU (a sample's rows almost always have one)."""
    positive = box_iou > 0 if allowed is None else (box_iou > 0) & allowed
    by_iou = positive.any(axis=1, keepdims=True)
    key = -box_iou
    if not by_iou.all():
        key = np.where(by_iou, key, _centre_d2(pb, gb).astype(np.float64))
    if allowed is not None:
        key = np.where(allowed, key, np.inf)  # disallowed sort last, then are masked out below
    cols = np.argsort(key, axis=1, kind="stable")[:, :k]
    return cols, None if allowed is None else np.take_along_axis(allowed, cols, axis=1)


def _centre_d2(pb: np.ndarray, gb: np.ndarray) -> np.ndarray:
    """P×G squared distances of the doubled box centres (doubled: the distance stays integral)."""
    pc = pb[:, :2] + pb[:, 2:]
    gc = gb[:, :2] + gb[:, 2:]
    return ((pc[:, None, :] - gc[None, :, :]) ** 2).sum(-1)


def _assign(cost: np.ndarray, miou: np.ndarray, fp_cost: float, fn_cost: float) -> list[tuple[int, int, float]]:
    """(pred, gt, mask IoU) pairs of the square problem [[cost, fp_cost], [fn_cost, 0]], forbidden pairs left out;
    ascending by pred."""
    n_p, n_g = cost.shape
    big = np.zeros((n_p + n_g, n_p + n_g))
    big[:n_p, :n_g] = cost
    big[:n_p, n_g:] = fp_cost
    big[n_p:, :n_g] = fn_cost
    # A square problem's row indices are 0..n-1 in order (scipy documents it): row i's column is cols[i].
    cols = linear_sum_assignment(big)[1][:n_p]
    rows = np.flatnonzero(cols < n_g)
    cols = cols[rows]
    kept = cost[rows, cols] < FORBIDDEN
    rows, cols = rows[kept], cols[kept]
    return list(zip(rows.tolist(), cols.tolist(), miou[rows, cols].tolist()))


def match_boxes(
    pred_boxes: Sequence[Sequence[int]],
    gt_boxes: Sequence[Sequence[int]],
    *,
    candidate_top_k: int = 10,
    gate: float = 0.3,
    resolution: int = 256,
    fp_cost: float = 1.0,
    fn_cost: float = 1.0,
    pred_descs: Sequence[str] | None = None,
    gt_descs: Sequence[str] | None = None,
    require_desc_match: bool = False,
) -> MatchResult:
    """One-to-one assignment of predictions to GT maximizing mask IoU subject to IoU ≥ gate.

    Candidates per prediction are its `candidate_top_k` GTs by box IoU; pairs with mask IoU < `gate` are
    forbidden and counted in `gating_rejections`. The square problem [[1 − IoU, fp_cost], [fn_cost, 0]]
    is solved with `linear_sum_assignment`. With `require_desc_match`, only GTs whose desc equals the
    prediction's (case-folded, stripped) are candidates; by default desc plays no part.

    Raises:
        ValueError: on a bad knob (k < 1, gate outside [0, 1], resolution < 1, negative costs) or
            desc lists missing / of the wrong length when `require_desc_match` is set.
    """
    if candidate_top_k < 1 or not 0.0 <= gate <= 1.0 or resolution < 1 or fp_cost < 0 or fn_cost < 0:
        raise ValueError(
            f"bad matching knobs: candidate_top_k={candidate_top_k} (>=1), gate={gate} (in [0,1]), "
            f"resolution={resolution} (>=1), fp_cost={fp_cost}, fn_cost={fn_cost} (>=0)"
        )
    pb, gb = _as_boxes(pred_boxes), _as_boxes(gt_boxes)
    n_p, n_g = len(pb), len(gb)
    allowed = _desc_mask(n_p, n_g, pred_descs, gt_descs, require_desc_match)
    if n_p == 0 or n_g == 0:
        return MatchResult([], list(range(n_p)), list(range(n_g)), 0)
    boxes = np.concatenate([pb, gb])
    # box_iou_matrix and mask_iou_matrix in one call: the boxes and their pixel rectangles, stacked
    both = np.stack([boxes, _pixel_rects(boxes, resolution)])
    biou, miou = _rect_iou(both[:, :n_p], both[:, n_p:])
    cand, valid = _candidates(biou, pb, gb, allowed, candidate_top_k)
    iou = miou[np.arange(n_p)[:, None], cand]
    passed = iou >= gate
    if valid is not None:
        passed &= valid
    rejections = int(passed.size - passed.sum()) if valid is None else int((valid & ~passed).sum())
    cost = np.full((n_p, n_g), FORBIDDEN)
    cost[np.nonzero(passed)[0], cand[passed]] = 1.0 - iou[passed]
    pairs = _assign(cost, miou, fp_cost, fn_cost)
    matched_p = {i for i, _, _ in pairs}
    matched_g = {j for _, j, _ in pairs}
    return MatchResult(
        pairs,
        [i for i in range(n_p) if i not in matched_p],
        [j for j in range(n_g) if j not in matched_g],
        rejections,
    )


def _desc_mask(n_p, n_g, pred_descs, gt_descs, require: bool) -> np.ndarray | None:
    """Which pairs may match: None when every pair may (no desc filter)."""
    if not require:
        return None
    if pred_descs is None or gt_descs is None or len(pred_descs) != n_p or len(gt_descs) != n_g:
        raise ValueError("require_desc_match needs pred_descs and gt_descs with one desc per box")
    norm = lambda s: str(s).strip().casefold()  # noqa: E731
    g = [norm(d) for d in gt_descs]
    return np.array([[norm(d) == gd for gd in g] for d in pred_descs], dtype=bool).reshape(n_p, n_g)


@dataclass(frozen=True)
class DetectionCounts:
    """Pooled detection counts; add them across samples, then read precision/recall/F1.

    With no predictions and no GT all three rates are 1; otherwise an empty denominator gives 0.
    """

    pred: int = 0
    gt: int = 0
    matched: int = 0
    gating_rejections: int = 0
    iou_sum: float = 0.0

    def __add__(self, other: DetectionCounts) -> DetectionCounts:
        return DetectionCounts(
            self.pred + other.pred,
            self.gt + other.gt,
            self.matched + other.matched,
            self.gating_rejections + other.gating_rejections,
            self.iou_sum + other.iou_sum,
        )

    @property
    def fp(self) -> int:
        return self.pred - self.matched

    @property
    def fn(self) -> int:
        return self.gt - self.matched

    def _rate(self, den: int) -> float:
        if self.pred == 0 and self.gt == 0:
            return 1.0
        return self.matched / den if den else 0.0

    @property
    def precision(self) -> float:
        return self._rate(self.pred)

    @property
    def recall(self) -> float:
        return self._rate(self.gt)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0


def detection_counts(
    pred_boxes: Sequence[Sequence[int]],
    gt_boxes: Sequence[Sequence[int]],
    *,
    pred_descs: Sequence[str] | None = None,
    gt_descs: Sequence[str] | None = None,
    require_desc_match: bool = False,
    **match_kwargs,
) -> DetectionCounts:
    """Match one sample's boxes (same knobs as `match_boxes`) and count pred/gt/matched."""
    m = match_boxes(
        pred_boxes,
        gt_boxes,
        pred_descs=pred_descs,
        gt_descs=gt_descs,
        require_desc_match=require_desc_match,
        **match_kwargs,
    )
    return DetectionCounts(len(pred_boxes), len(gt_boxes), len(m.pairs), m.gating_rejections, m.iou_sum)
