"""Hungarian matching with candidate top-k, mask-IoU gate and dummy costs."""

import itertools

import numpy as np
import pytest

from toolkit.rollout.match import (
    DetectionCounts,
    box_iou,
    detection_counts,
    mask_iou_matrix,
    match_boxes,
)

KNOBS = dict(candidate_top_k=5, gate=0.3, resolution=256, fp_cost=0.5, fn_cost=2.0)


def test_box_iou():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou([3, 3, 3, 9], [3, 3, 3, 9]) == 0.0  # zero-area union


def oracle_mask_iou(a, b, r):
    """The predecessor's gate IoU, pair by pair: pycocotools polygon masks of the clamped, scaled quads."""
    from pycocotools import mask as mask_utils

    def rle(box):
        x1, y1, x2, y2 = (min(max(float(v), 0.0), 999.0) * max(r - 1, 1) / 999.0 for v in box)
        x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
        return mask_utils.merge(mask_utils.frPyObjects([[x1, y1, x2, y1, x2, y2, x1, y2]], r, r))

    return float(mask_utils.iou([rle(a)], [rle(b)], [0])[0][0])


def random_box(rng, max_side=999):
    """A box of a log-uniform side from 0 (degenerate) or 1 bin up to the full canvas, anywhere on it."""

    def side():
        return 0 if rng.random() < 0.05 else int(round(np.exp(rng.uniform(0, np.log(max_side)))))

    w, h = side(), side()
    x1, y1 = int(rng.integers(0, 1000 - w)), int(rng.integers(0, 1000 - h))
    return [x1, y1, x1 + w, y1 + h]


def near(rng, box):
    """A second box near `box` (shifted and rescaled by up to its own size), so IoUs span 0..1."""
    w, h = box[2] - box[0], box[3] - box[1]
    dx, dy = (int(rng.integers(-s - 1, s + 2)) for s in (w, h))
    x1, y1 = box[0] + dx, box[1] + dy
    nw, nh = (max(0, int(round(s * rng.uniform(0.5, 1.5)))) for s in (w, h))
    return [min(max(v, 0), 999) for v in (x1, y1, x1 + nw, y1 + nh)]


def pycocotools_iou_matrix(preds, gts, r):
    """The gate IoU as pycocotools computes it, P×G: each box's quad drawn by `frPyObjects`, then `iou`."""
    from pycocotools import mask as mask_utils

    def rles(boxes):
        v = np.clip(np.asarray(boxes, dtype=np.float64), 0, 999) * (max(r - 1, 1) / 999)
        x1, x2 = np.minimum(v[:, 0], v[:, 2]), np.maximum(v[:, 0], v[:, 2])
        y1, y2 = np.minimum(v[:, 1], v[:, 3]), np.maximum(v[:, 1], v[:, 3])
        return mask_utils.frPyObjects(np.stack([x1, y1, x2, y1, x2, y2, x1, y2], axis=1).tolist(), r, r)

    return np.asarray(mask_utils.iou(rles(preds), rles(gts), [0] * len(gts)), dtype=np.float64)


def test_mask_iou_is_exactly_pycocotools_on_random_blocks_and_every_bin():
    """`mask_iou_matrix` draws no masks (a box's mask is a pixel rectangle in closed form); its P×G IoUs are
    bit-identical to pycocotools' on random blocks at many resolutions, and so are the pixel areas of boxes
    starting and ending at every bin."""
    from pycocotools import mask as mask_utils

    from toolkit.rollout.match import _pixel_rects

    rng = np.random.default_rng(1)
    for r in (1, 2, 3, 5, 7, 64, 255, 256, 257, 999, 1000, 1024):
        for _ in range(8):
            preds = [random_box(rng, max_side=rng.choice([20, 999])) for _ in range(30)]
            gts = [near(rng, a) if rng.random() < 0.7 else random_box(rng) for a in preds[:25]]
            assert np.array_equal(mask_iou_matrix(preds, gts, r), pycocotools_iou_matrix(preds, gts, r)), r
        edges = [[x, x, min(x + w, 999), min(x + 2 * w, 999)] for x in range(1000) for w in (0, 1, 3, 17)]
        edges += [[max(x - w, 0), 0, x, x] for x in range(1000) for w in (1, 2, 9)]
        v = np.clip(np.asarray(edges, dtype=np.float64), 0, 999) * (max(r - 1, 1) / 999)
        quads = np.stack([v[:, 0], v[:, 1], v[:, 2], v[:, 1], v[:, 2], v[:, 3], v[:, 0], v[:, 3]], axis=1).tolist()
        want = [mask_utils.area(rle) for rle in mask_utils.frPyObjects(quads, r, r)]
        rect = _pixel_rects(np.asarray(edges), r)
        assert np.array_equal((rect[:, 2] - rect[:, 0]) * (rect[:, 3] - rect[:, 1]), want), r


def test_mask_iou_equals_pycocotools_polygon_iou_on_random_pairs():
    """≥ 10,000 pairs, 1 bin to full canvas, degenerate boxes, R ∈ {1, 2, 7, 256, 1000}: agree to 1e-6."""
    rng = np.random.default_rng(0)
    checked, positive = 0, 0
    for r, n in ((256, 6000), (1000, 2000), (7, 1000), (2, 500), (1, 500)):
        preds, gts = [], []
        for _ in range(n):
            a = random_box(rng)
            preds.append(a)
            gts.append(near(rng, a) if rng.random() < 0.8 else random_box(rng))
        got = np.array([mask_iou_matrix([a], [b], r)[0, 0] for a, b in zip(preds, gts)])
        want = np.array([oracle_mask_iou(a, b, r) for a, b in zip(preds, gts)])
        assert np.abs(got - want).max() <= 1e-6, r
        block = mask_iou_matrix(preds[:40], gts[:30], r)  # the P×G form agrees with the pairs too
        assert block.shape == (40, 30)
        for i, j in itertools.product(range(40), range(30)):
            assert abs(block[i, j] - oracle_mask_iou(preds[i], gts[j], r)) <= 1e-6
        checked += n
        positive += int(((want > 0) & (want < 1)).sum())
    assert checked >= 10_000 and positive > 3000  # the IoUs are not all 0 or 1


def test_mask_iou_of_small_near_miss_is_the_reference_value_and_is_gated():
    """The audit's case: pycocotools gives 0.143 (= box IoU), below the 0.3 gate; a pixel-cover raster said 0.391."""
    pred, gt = [105, 105, 115, 115], [100, 100, 110, 110]
    assert mask_iou_matrix([pred], [gt], 256)[0, 0] == pytest.approx(1 / 7, abs=1e-6)
    m = match_boxes([pred], [gt], **KNOBS)
    assert m.pairs == [] and m.fp_indices == [0] and m.fn_indices == [0] and m.gating_rejections == 1


def test_degenerate_boxes_have_empty_masks_and_never_match():
    """As in the reference: a zero-width box has no pixels, so even an identical GT scores 0."""
    line, dot = [5, 5, 5, 50], [0, 0, 0, 0]
    assert mask_iou_matrix([line, dot], [line, dot, [0, 0, 999, 999]], 256).tolist() == [[0.0] * 3] * 2
    assert match_boxes([line], [line], **KNOBS).pairs == []
    assert mask_iou_matrix([], [line], 256).shape == (0, 1)


def test_coordinates_outside_the_bins_are_clamped():
    assert mask_iou_matrix([[-50, -50, 500, 500]], [[0, 0, 500, 500]], 256)[0, 0] == 1.0
    assert mask_iou_matrix([[500, 500, 5000, 5000]], [[500, 500, 999, 999]], 256)[0, 0] == 1.0


def test_identical_boxes_match_one_to_one():
    boxes = [[10, 10, 50, 50], [400, 400, 600, 650], [700, 100, 900, 300]]
    m = match_boxes(boxes, list(reversed(boxes)), **KNOBS)
    assert [(i, j) for i, j, _ in m.pairs] == [(0, 2), (1, 1), (2, 0)]
    assert all(iou == 1.0 for _, _, iou in m.pairs)
    assert m.fp_indices == [] and m.fn_indices == []
    assert m.gating_rejections == 6  # every candidate pair (top-5 of 3) other than the three matches


def test_far_apart_boxes_are_all_fp_and_fn():
    preds = [[0, 0, 10, 10], [20, 0, 30, 10]]
    gts = [[900, 900, 990, 990], [800, 900, 850, 990], [600, 600, 610, 610]]
    m = match_boxes(preds, gts, candidate_top_k=2, gate=0.5, resolution=256, fp_cost=1.0, fn_cost=1.0)
    assert m.pairs == [] and m.fp_indices == [0, 1] and m.fn_indices == [0, 1, 2]
    assert m.gating_rejections == 4  # 2 preds × top-2 candidates (by centre distance), all below the gate


def test_candidate_top_k_is_respected():
    # pred 0 overlaps GT 0 best, GT 1 second; with k=1 only GT 0 is a candidate of either pred, and GT 0
    # goes to pred 1 (mask IoU 0.958 against pred 0's 0.950).
    preds = [[0, 0, 100, 100], [0, 0, 90, 100]]
    gts = [[0, 0, 95, 100], [0, 0, 60, 100]]
    assert box_iou(preds[0], gts[0]) > box_iou(preds[0], gts[1]) > 0.5
    assert box_iou(preds[1], gts[0]) > box_iou(preds[1], gts[1])
    wide = match_boxes(preds, gts, **{**KNOBS, "candidate_top_k": 2})
    narrow = match_boxes(preds, gts, **{**KNOBS, "candidate_top_k": 1})
    assert len(wide.pairs) == 2
    assert [(i, j) for i, j, _ in narrow.pairs] == [(1, 0)] and narrow.fp_indices == [0] and narrow.fn_indices == [1]


def test_gate_is_inclusive_and_counts_rejections():
    preds = [[0, 0, 100, 100]]
    gts = [[0, 0, 100, 100], [0, 0, 100, 5]]
    m = match_boxes(preds, gts, **{**KNOBS, "gate": 1.0})
    assert [(i, j) for i, j, _ in m.pairs] == [(0, 0)] and m.gating_rejections == 1


def test_assignment_maximizes_total_iou():
    preds = [[0, 0, 100, 100], [0, 0, 100, 60]]
    gts = [[0, 0, 100, 70], [0, 0, 100, 100]]
    m = match_boxes(preds, gts, **KNOBS)
    assert [(i, j) for i, j, _ in m.pairs] == [(0, 1), (1, 0)]


def test_dummy_costs_decide_marginal_pairs():
    preds, gts = [[0, 0, 100, 100]], [[0, 0, 100, 40]]  # mask IoU ≈ 0.4: match costs ≈ 0.6
    assert len(match_boxes(preds, gts, **{**KNOBS, "fp_cost": 0.5, "fn_cost": 2.0}).pairs) == 1
    assert len(match_boxes(preds, gts, **{**KNOBS, "fp_cost": 0.2, "fn_cost": 0.2}).pairs) == 0


def test_empty_sides():
    assert match_boxes([], [[0, 0, 1, 1]], **KNOBS).fn_indices == [0]
    assert match_boxes([[0, 0, 1, 1]], [], **KNOBS).fp_indices == [0]


def test_desc_is_ignored_unless_required():
    preds, gts = [[0, 0, 100, 100]], [[0, 0, 100, 100]]
    assert len(match_boxes(preds, gts, **KNOBS, pred_descs=["cat"], gt_descs=["dog"]).pairs) == 1
    strict = match_boxes(preds, gts, **KNOBS, pred_descs=["cat"], gt_descs=["dog"], require_desc_match=True)
    assert strict.pairs == []
    assert (
        len(match_boxes(preds, gts, **KNOBS, pred_descs=[" Cat"], gt_descs=["cat"], require_desc_match=True).pairs) == 1
    )
    with pytest.raises(ValueError, match="pred_descs"):
        match_boxes(preds, gts, **KNOBS, require_desc_match=True)


def test_bad_knobs_raise():
    with pytest.raises(ValueError, match="candidate_top_k"):
        match_boxes([], [], **{**KNOBS, "candidate_top_k": 0})


def test_detection_counts_pool_and_rates():
    c = detection_counts([[0, 0, 10, 10], [500, 500, 600, 600]], [[0, 0, 10, 10]], **KNOBS)
    assert (c.pred, c.gt, c.matched, c.fp, c.fn) == (2, 1, 1, 1, 0)
    total = c + detection_counts([], [[0, 0, 5, 5]], **KNOBS)
    assert total.precision == 0.5 and total.recall == 0.5 and total.f1 == 0.5
    assert DetectionCounts().f1 == 1.0  # nothing to find, nothing predicted
    assert detection_counts([], [[0, 0, 1, 1]], **KNOBS).f1 == 0.0


def test_no_predictions_and_no_gt_score_one_not_zero():
    """Differs from the predecessor (0): an image with nothing to find, answered with nothing, is perfect."""
    empty = DetectionCounts()
    assert (empty.precision, empty.recall, empty.f1) == (1.0, 1.0, 1.0)
    assert (DetectionCounts(pred=0, gt=2).recall, DetectionCounts(pred=2, gt=0).precision) == (0.0, 0.0)
    assert (empty + DetectionCounts(pred=1, gt=1, matched=1)).f1 == 1.0


def _rowwise_reference(preds, gts, descs_p, descs_g, require, k, gate, r, fp_cost, fn_cost):
    """The matcher as first written, one prediction at a time: candidates per row (allowed GTs by box IoU,
    ties by index, or by centre distance when no allowed IoU is positive), gate, dummy-augmented LSA."""
    from scipy.optimize import linear_sum_assignment

    from toolkit.rollout.match import FORBIDDEN, box_iou_matrix

    n_p, n_g = len(preds), len(gts)
    biou, miou = box_iou_matrix(preds, gts), mask_iou_matrix(preds, gts, r)
    cost, rejections = np.full((n_p, n_g), FORBIDDEN), 0
    for i in range(n_p):
        same = [descs_p[i].strip().casefold() == d.strip().casefold() for d in descs_g]
        idx = np.array([j for j in range(n_g) if not require or same[j]], dtype=np.int64)
        if idx.size:
            pc = np.array(preds[i][:2]) + np.array(preds[i][2:])
            d2 = [int(((pc - (np.array(gts[j][:2]) + np.array(gts[j][2:]))) ** 2).sum()) for j in idx]
            row = biou[i, idx]
            order = np.argsort(-row, kind="stable") if row.max() > 0 else np.argsort(d2, kind="stable")
            for j in idx[order[:k]]:
                if miou[i, j] >= gate:
                    cost[i, j] = 1.0 - miou[i, j]
                else:
                    rejections += 1
    big = np.zeros((n_p + n_g, n_p + n_g))
    big[:n_p, :n_g], big[:n_p, n_g:], big[n_p:, :n_g] = cost, fp_cost, fn_cost
    rows, cols = linear_sum_assignment(big)
    pairs = sorted(
        (int(i), int(j), float(miou[i, j]))
        for i, j in zip(rows, cols)
        if i < n_p and j < n_g and cost[i, j] < FORBIDDEN
    )
    return pairs, rejections


@pytest.mark.parametrize("gate", [0.3, 0.0])
@pytest.mark.parametrize("require", [False, True])
def test_vectorized_candidates_equal_the_rowwise_reference(require, gate):
    """match_boxes selects candidates for all predictions at once; the same pairs and rejections as row by row,
    on crowded scenes (60×60, many small boxes, ties, rows with no positive IoU, desc filters). At gate 0 the
    centre-distance order of a row with no positive IoU decides its pairs (above it, every such candidate is gated
    out whatever the order)."""
    rng = np.random.default_rng(3)
    for trial in range(40):
        n_p, n_g = int(rng.integers(0, 61)), int(rng.integers(0, 61))
        gts = [random_box(rng, 60 if rng.random() < 0.6 else 999) for _ in range(n_g)]
        preds = [
            list(np.clip(np.array(gts[int(rng.integers(n_g))]) + rng.integers(-4, 5, 4), 0, 999))
            if n_g and rng.random() < 0.7
            else random_box(rng)
            for _ in range(n_p)
        ]
        preds = [[min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])] for b in preds]
        descs_p = [str(rng.choice(["cat", "Dog ", "bus"])) for _ in range(n_p)]
        descs_g = [str(rng.choice(["cat", "dog", "car"])) for _ in range(n_g)]
        k = int(rng.integers(1, 8))
        got = match_boxes(
            preds,
            gts,
            candidate_top_k=k,
            gate=gate,
            resolution=256,
            fp_cost=0.5,
            fn_cost=2.0,
            pred_descs=descs_p,
            gt_descs=descs_g,
            require_desc_match=require,
        )
        want_pairs, want_rej = _rowwise_reference(preds, gts, descs_p, descs_g, require, k, gate, 256, 0.5, 2.0)
        assert (got.pairs, got.gating_rejections) == (want_pairs, want_rej), trial
