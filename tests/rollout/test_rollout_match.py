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


def brute_mask_iou(a, b, r):
    """Reference raster: paint each box's pixel set on an r×r grid and count."""
    def mask(box):
        m = np.zeros((r, r), bool)
        u = [min(max(v, 0), 999) * (r - 1) / 999 for v in box]
        c1, r1 = int(np.floor(u[0])), int(np.floor(u[1]))
        c2, r2 = max(int(np.ceil(u[2])), c1 + 1), max(int(np.ceil(u[3])), r1 + 1)
        m[r1:r2, c1:c2] = True
        return m
    ma, mb = mask(a), mask(b)
    return (ma & mb).sum() / (ma | mb).sum()


@pytest.mark.parametrize("r", [1, 2, 7, 256])
def test_mask_iou_is_exact_raster_iou(r):
    rng = np.random.default_rng(r)
    boxes = []
    for _ in range(12):
        x1, x2 = sorted(rng.integers(0, 1000, 2))
        y1, y2 = sorted(rng.integers(0, 1000, 2))
        boxes.append([int(x1), int(y1), int(x2), int(y2)])
    boxes += [[0, 0, 0, 0], [999, 999, 999, 999], [500, 500, 501, 501]]
    got = mask_iou_matrix(boxes, boxes, r)
    for i, j in itertools.product(range(len(boxes)), repeat=2):
        assert got[i, j] == pytest.approx(brute_mask_iou(boxes[i], boxes[j], r), abs=1e-12)
    assert np.allclose(np.diag(got), 1.0)  # degenerate and sub-pixel boxes still match themselves


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
    # pred 0 overlaps GT 0 best, GT 1 second; with k=1 only GT 0 is a candidate, and GT 0 goes to pred 1.
    preds = [[0, 0, 100, 100], [0, 0, 90, 100]]
    gts = [[0, 0, 95, 100], [0, 0, 60, 100]]
    assert box_iou(preds[0], gts[0]) > box_iou(preds[0], gts[1]) > 0.5
    assert box_iou(preds[1], gts[0]) > box_iou(preds[1], gts[1])
    wide = match_boxes(preds, gts, **{**KNOBS, "candidate_top_k": 2})
    narrow = match_boxes(preds, gts, **{**KNOBS, "candidate_top_k": 1})
    assert len(wide.pairs) == 2
    assert len(narrow.pairs) == 1 and narrow.fp_indices == [1] and narrow.fn_indices == [1]


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
    assert len(match_boxes(preds, gts, **KNOBS, pred_descs=[" Cat"], gt_descs=["cat"],
                           require_desc_match=True).pairs) == 1
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
