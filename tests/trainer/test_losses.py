"""Pack loss: CE masking, expectation decode, geometry, regularizers, gate, and a hand-computed example."""

import math

import pytest
import torch
from _pack_helpers import COORD_IDS, VOCAB, make_segment

from toolkit.trainer.losses import PART_KEYS, LossWeights, complete_iou, expectation_decode, huber, pack_loss
from toolkit.trainer.packing import collate_pack

ALL_ON = LossWeights(
    bbox_smoothl1_weight=2.0,
    bbox_ciou_weight=0.7,
    coord_ce_weight=0.3,
    coord_el1_weight=0.4,
    coord_ehuber_weight=0.5,
    coord_huber_delta=0.05,
    coord_entropy_weight=-0.2,
    coord_gate_weight=0.6,
    softctx_temperature=0.8,
)
CE_ONLY = LossWeights(bbox_smoothl1_weight=0.0, bbox_ciou_weight=0.0, coord_gate_weight=0.0)


def _logits(batch, seed=0, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(1, batch.length, VOCAB, generator=g, dtype=torch.float64)).to(dtype)


def _batch(groups=("prefix", "fn"), channel="B"):
    return collate_pack(
        [make_segment(20 + i, prompt_len=3, n_boxes=1, group=g, channel=channel) for i, g in enumerate(groups)]
    )


def test_expectation_decode_two_peaks_gives_half_not_argmax():
    z = torch.full((1000,), -1e4)
    z[0] = z[999] = 10.0
    z[999] += 1e-3  # argmax would say 1.0
    assert expectation_decode(z).item() == pytest.approx(0.5, abs=1e-3)
    one_hot = torch.full((1000,), -1e4)
    one_hot[333] = 0.0
    assert expectation_decode(one_hot).item() == pytest.approx(333 / 999, abs=1e-6)  # /999, not /1000


def test_ciou_and_smoothl1_finite_for_non_canonical_and_degenerate_pred():
    gt = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.3, 0.9]])
    pred = torch.tensor([[0.8, 0.9, 0.1, 0.2], [0.4, 0.4, 0.4, 0.4]], requires_grad=True)
    c = complete_iou(pred, gt)
    assert torch.isfinite(c).all() and (c <= 1).all() and (c >= -1).all()
    (1 - c).sum().backward()
    assert torch.isfinite(pred.grad).all()
    # A non-canonical pred is scored as its canonical box.
    canon = torch.tensor([[0.1, 0.2, 0.8, 0.9]])
    assert complete_iou(pred[:1].detach(), gt[:1]).item() == pytest.approx(complete_iou(canon, gt[:1]).item())
    assert complete_iou(gt[:1], gt[:1]).item() == pytest.approx(1.0, abs=1e-6)


def test_ce_ignores_unsupervised_positions():
    b = _batch()
    logits = _logits(b)
    _, parts = pack_loss(logits, logits, b, COORD_IDS, ALL_ON)
    w = b.ce_weights[0]
    changed = logits.clone()
    # Rows t-1 for every label t with weight 0 (prompt and coord slots) get new random values.
    for t in range(1, b.length):
        if w[t] == 0:
            changed[0, t - 1] = torch.randn(VOCAB)
    _, parts2 = pack_loss(changed, logits, b, COORD_IDS, ALL_ON)
    assert parts2["loss/ce"] == parts["loss/ce"]
    changed[0, b.length - 2, 7] += 3.0  # the final <|im_end|> (id 7) label is supervised
    _, parts3 = pack_loss(changed, logits, b, COORD_IDS, ALL_ON)
    assert parts3["loss/ce"] != parts["loss/ce"]


def test_ce_gradient_is_zero_at_rows_predicting_coord_tokens():
    b = _batch()
    logits = _logits(b).requires_grad_(True)
    loss, _ = pack_loss(logits, logits, b, COORD_IDS, CE_ONLY)
    loss.backward()
    grad_norm = logits.grad[0].abs().sum(-1)
    assert grad_norm[b.coord_pos - 1].max().item() == 0.0
    supervised = torch.nonzero(b.ce_weights[0, 1:]).squeeze(1)
    assert (grad_norm[supervised] > 0).all()


def test_geometry_only_touches_coord_rows_and_coord_slice_without_gate():
    b = _batch()
    logits = _logits(b).requires_grad_(True)
    geo = LossWeights(coord_gate_weight=0.0)
    loss, parts = pack_loss(torch.zeros_like(logits), logits, b, COORD_IDS, geo)
    loss.backward()
    g = logits.grad[0]
    rows = set((b.coord_pos - 1).tolist())
    other_rows = [r for r in range(b.length) if r not in rows]
    assert g[other_rows].abs().max().item() == 0.0
    non_coord = [i for i in range(VOCAB) if i not in set(COORD_IDS)]
    assert g[:, non_coord].abs().max().item() == 0.0
    assert parts["loss/bbox_smoothl1"] > 0 and parts["loss/bbox_ciou"] > 0


def _coord_mass(logits, b):
    p = torch.softmax(logits[0, b.coord_pos - 1], dim=-1)
    return p[:, COORD_IDS].sum(-1)


def test_gate_gradient_moves_mass_onto_coord_tokens():
    b = _batch()
    logits = _logits(b, scale=1.0).requires_grad_(True)
    gate_only = LossWeights(bbox_smoothl1_weight=0.0, bbox_ciou_weight=0.0, coord_gate_weight=1.0)
    zero_ce = torch.zeros_like(logits)
    loss, parts = pack_loss(zero_ce, logits, b, COORD_IDS, gate_only)
    before = _coord_mass(logits.detach(), b)
    assert parts["loss/coord_gate"] == pytest.approx(-before.log().mean().item(), rel=1e-5)
    loss.backward()
    after = _coord_mass(logits.detach() - 1.0 * logits.grad, b)
    assert (after > before).all()
    # With weight 0 the gate is still logged but contributes no gradient.
    logits.grad = None
    loss0, parts0 = pack_loss(zero_ce, logits, b, COORD_IDS, CE_ONLY)
    assert parts0["loss/coord_gate"] == pytest.approx(parts["loss/coord_gate"])
    assert not loss0.requires_grad or torch.autograd.grad(loss0, logits)[0].abs().max() == 0


def test_fn_only_pack_has_geometry_and_tail_part():
    b = _batch(groups=("fn", "fn"), channel="A")
    logits = _logits(b)
    _, parts = pack_loss(logits, logits, b, COORD_IDS, LossWeights())
    assert parts["loss/bbox_smoothl1"] > 0 and parts["loss/bbox_ciou"] > 0
    assert parts["loss/coord_prefix"] == 0.0
    assert parts["loss/coord_tail"] == pytest.approx(parts["loss/bbox_smoothl1"] + parts["loss/bbox_ciou"])


def test_prefix_and_tail_parts_combine_by_box_count_or_by_sample():
    b = collate_pack(
        [make_segment(30, n_boxes=2, group="prefix", channel="B"), make_segment(31, group="fn", channel="B")]
    )
    logits = _logits(b)
    w = LossWeights(bbox_smoothl1_weight=2.0, bbox_ciou_weight=0.5)
    _, parts = pack_loss(logits, logits, b, COORD_IDS, w, "per_pack_token_mean")
    bbox = 2.0 * parts["loss/bbox_smoothl1"] + 0.5 * parts["loss/bbox_ciou"]
    assert bbox == pytest.approx((2 * parts["loss/coord_prefix"] + 1 * parts["loss/coord_tail"]) / 3)
    # per_sample: each sample here holds one group, so the pack's geometry is (prefix_30 + tail_31) / 2
    # and each group part is its sample's geometry / 2.
    _, parts = pack_loss(logits, logits, b, COORD_IDS, w, "per_sample")
    bbox = 2.0 * parts["loss/bbox_smoothl1"] + 0.5 * parts["loss/bbox_ciou"]
    assert bbox == pytest.approx(parts["loss/coord_prefix"] + parts["loss/coord_tail"])


def test_per_sample_pack_loss_is_the_mean_of_each_sample_alone():
    """The packing invariance at the loss level: a pack's loss = the mean of its samples' one-sample losses."""
    segs = [
        make_segment(50, n_boxes=2, group="prefix", channel="B"),
        make_segment(51, n_boxes=0, channel="B"),
        make_segment(52, n_boxes=1, text_per_box=5, group="fn", channel="B"),
    ]
    b = collate_pack(segs)
    logits = _logits(b, seed=9, dtype=torch.float64)
    loss, parts = pack_loss(logits, logits, b, COORD_IDS, ALL_ON)
    offsets = [0, len(segs[0]), len(segs[0]) + len(segs[1])]
    alone = []
    for seg, off in zip(segs, offsets):
        one = collate_pack([seg])
        alone.append(
            pack_loss(logits[:, off : off + len(seg)], logits[:, off : off + len(seg)], one, COORD_IDS, ALL_ON)[1]
        )
    for key in PART_KEYS:
        assert parts[key] == pytest.approx(sum(a[key] for a in alone) / 3, rel=1e-12, abs=1e-12), key
    _, pooled = pack_loss(logits, logits, b, COORD_IDS, ALL_ON, "per_pack_token_mean")
    assert abs(pooled["loss/total"] - parts["loss/total"]) > 1e-3
    with pytest.raises(ValueError, match="per_sample|per_pack_token_mean"):
        pack_loss(logits, logits, b, COORD_IDS, ALL_ON, "per_token")


def test_no_coord_slots_and_no_supervision_give_zero_terms_with_graph():
    seg = make_segment(40, n_boxes=0)
    b = collate_pack([seg])
    logits = _logits(b).requires_grad_(True)
    loss, parts = pack_loss(logits, logits, b, COORD_IDS, ALL_ON)
    assert parts["loss/bbox_smoothl1"] == 0.0 and parts["loss/coord_gate"] == 0.0
    assert all(math.isfinite(v) for v in parts.values())
    seg.ce_weights = [0.0] * len(seg)
    b = collate_pack([seg])
    loss, parts = pack_loss(logits, logits, b, COORD_IDS, ALL_ON)
    assert parts["loss/ce"] == 0.0 and parts["loss/total"] == 0.0
    loss.backward()  # still a graph, so every rank can run its backward
    assert logits.grad.abs().max() == 0


def test_parts_keys_and_total():
    b = _batch()
    logits = _logits(b)
    loss, parts = pack_loss(logits, logits, b, COORD_IDS, ALL_ON)
    assert tuple(parts) == PART_KEYS
    w = ALL_ON
    reg = (
        w.coord_ce_weight * parts["loss/coord_ce"]
        + w.coord_el1_weight * parts["loss/coord_el1"]
        + w.coord_ehuber_weight * parts["loss/coord_ehuber"]
        + w.coord_entropy_weight * parts["loss/coord_entropy"]
    )
    assert parts["loss/coord_reg"] == pytest.approx(reg)
    total = (
        parts["loss/ce"]
        + w.bbox_smoothl1_weight * parts["loss/bbox_smoothl1"]
        + w.bbox_ciou_weight * parts["loss/bbox_ciou"]
        + reg
        + w.coord_gate_weight * parts["loss/coord_gate"]
    )
    assert parts["loss/total"] == pytest.approx(total) == pytest.approx(loss.item())


def test_regularizers_zero_when_weight_zero():
    b = _batch()
    logits = _logits(b)
    _, parts = pack_loss(logits, logits, b, COORD_IDS, LossWeights())
    for k in ("loss/coord_ce", "loss/coord_el1", "loss/coord_ehuber", "loss/coord_entropy", "loss/coord_reg"):
        assert parts[k] == 0.0


@pytest.mark.parametrize("normalization", ["per_sample", "per_pack_token_mean"])
def test_logits_at_the_kept_rows_give_the_full_loss_and_gradient(normalization):
    """The learner computes logits only at `logit_rows` (logits_to_keep): the loss and its gradient are those
    of the full logits, whose other rows get no gradient."""
    b = collate_pack([make_segment(30 + i, prompt_len=4 + 3 * i, n_boxes=1 + i, group="fn") for i in range(3)])
    rows = b.logit_rows
    assert torch.equal(rows, torch.unique(torch.cat([torch.nonzero(b.ce_weights[0, 1:]).flatten(), b.coord_pos - 1])))
    assert rows.numel() < b.length  # the prompts' rows are left out
    full = _logits(b).requires_grad_()
    kept = full.detach()[:, rows].clone().requires_grad_()
    total_full, parts_full = pack_loss(full, full, b, COORD_IDS, ALL_ON, normalization)
    total_kept, parts_kept = pack_loss(kept, kept, b, COORD_IDS, ALL_ON, normalization)
    assert parts_kept == parts_full
    total_full.backward()
    total_kept.backward()
    assert torch.equal(full.grad[:, rows], kept.grad)
    others = torch.ones(b.length, dtype=torch.bool)
    others[rows] = False
    assert full.grad[:, others].abs().max() == 0


def test_unsupervised_pack_keeps_one_logit_row():
    b = collate_pack([make_segment(40, prompt_len=5, n_boxes=0, text_per_box=0)])
    b.ce_weights.zero_()
    assert b.logit_rows.tolist() == [0]


def test_sliced_logits_and_bad_coord_ids_raise():
    b = _batch()
    logits = _logits(b)
    with pytest.raises(ValueError, match=r"logits of shape \(19, 1100\) for a pack of 20 tokens.*logit_rows"):
        pack_loss(logits[:, 1:], logits, b, COORD_IDS, ALL_ON)
    with pytest.raises(ValueError, match="1000 ids"):
        pack_loss(logits, logits, b, COORD_IDS[:10], ALL_ON)


def test_loss_weights_from_mapping():
    section = {f: getattr(ALL_ON, f) for f in ALL_ON.__dataclass_fields__}
    section.update(n_softctx_iter=2, schedule={"b_ratio": 0.05}, desc_ce_weight=1.0)
    assert LossWeights.from_mapping(section) == ALL_ON
    del section["coord_gate_weight"]
    with pytest.raises(KeyError, match="stage2_ab.coord_gate_weight"):
        LossWeights.from_mapping(section)
    with pytest.raises(ValueError, match="coord_ce_weight must be >= 0.*softctx_temperature must be > 0"):
        LossWeights(coord_ce_weight=-1.0, softctx_temperature=0.0)
    LossWeights(coord_entropy_weight=-0.5)  # allowed: rewards entropy


# ----------------------------------------------------------------------------------------------------
# Hand-computed reference: plain-Python loops in float64, independent of the tensor implementation.


def _ref_softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def _ref_ciou(p, g, eps=1e-7):
    px1, px2 = sorted((p[0], p[2]))
    py1, py2 = sorted((p[1], p[3]))
    px1, py1, px2, py2 = (min(max(v, 0.0), 1.0) for v in (px1, py1, px2, py2))
    gx1, gy1, gx2, gy2 = g
    inter = max(0.0, min(px2, gx2) - max(px1, gx1)) * max(0.0, min(py2, gy2) - max(py1, gy1))
    pw, ph, gw, gh = px2 - px1, py2 - py1, gx2 - gx1, gy2 - gy1
    iou = inter / (pw * ph + gw * gh - inter + eps)
    c2 = (max(px2, gx2) - min(px1, gx1)) ** 2 + (max(py2, gy2) - min(py1, gy1)) ** 2 + eps
    rho2 = ((px1 + px2 - gx1 - gx2) ** 2 + (py1 + py2 - gy1 - gy2) ** 2) / 4
    v = 4 / math.pi**2 * (math.atan(gw / (gh + eps)) - math.atan(pw / (ph + eps))) ** 2
    alpha = v / (1 - iou + v + eps)
    return iou - rho2 / c2 - alpha * v


def _reference(logits, b, w, normalization="per_sample"):
    """Per-token / per-slot / per-box values, each tagged with its sample, then averaged by the rule:
    per_sample = within each sample, then over samples; per_pack_token_mean = over the pack."""
    z_all = logits[0].tolist()
    ids = b.input_ids[0].tolist()
    cw = b.ce_weights[0].tolist()
    owner = [i for i, n in enumerate(b.seq_lens.tolist()) for _ in range(n)]  # sample of each position
    n_samples = len(b.seq_lens)

    def avg(items):  # items: (sample, value, weight)
        if not items:
            return 0.0
        if normalization == "per_pack_token_mean":
            return sum(v * wt for _, v, wt in items) / sum(wt for _, _, wt in items)
        total = 0.0
        for s_ in range(n_samples):
            mine = [(v, wt) for o, v, wt in items if o == s_]
            if mine:
                total += sum(v * wt for v, wt in mine) / sum(wt for _, wt in mine)
        return total / n_samples

    ce = []
    for t in range(1, len(ids)):
        if cw[t]:
            pr = _ref_softmax(z_all[t - 1])
            ce.append((owner[t], -math.log(pr[ids[t]]), cw[t]))
    tau, delta = w.softctx_temperature, w.coord_huber_delta
    chat, gts, sl1, gate, cce, el1, eh, ent = [], [], [], [], [], [], [], []
    for p_lab, k in zip(b.coord_pos.tolist(), b.coord_bins.tolist()):
        o = owner[p_lab]
        row = z_all[p_lab - 1]
        zc = [row[i] for i in COORD_IDS]
        pt = _ref_softmax([v / tau for v in zc])
        c = sum(pt[j] * j / 999 for j in range(1000))
        g = k / 999
        chat.append(c)
        gts.append(g)
        d = abs(c - g)
        sl1.append((o, 0.5 * d * d if d < 1 else d - 0.5, 1.0))
        full = _ref_softmax(row)
        gate.append((o, -math.log(sum(full[i] for i in COORD_IDS)), 1.0))
        cce.append((o, -math.log(_ref_softmax(zc)[k]), 1.0))
        errs = [abs(j / 999 - g) for j in range(1000)]
        el1.append((o, sum(pj * e for pj, e in zip(pt, errs)), 1.0))
        eh.append(
            (o, sum(pj * (0.5 * e * e / delta if e < delta else e - 0.5 * delta) for pj, e in zip(pt, errs)), 1.0)
        )
        ent.append((o, -sum(pj * math.log(pj) for pj in pt if pj > 0), 1.0))
    box_owner = [owner[p_lab] for p_lab in b.coord_pos.tolist()[0::4]]
    cious = [(box_owner[i // 4], 1 - _ref_ciou(chat[i : i + 4], gts[i : i + 4]), 1.0) for i in range(0, len(chat), 4)]
    reg = (
        w.coord_ce_weight * avg(cce)
        + w.coord_el1_weight * avg(el1)
        + w.coord_ehuber_weight * avg(eh)
        + w.coord_entropy_weight * avg(ent)
    )
    total = (
        avg(ce)
        + w.bbox_smoothl1_weight * avg(sl1)
        + w.bbox_ciou_weight * avg(cious)
        + reg
        + w.coord_gate_weight * avg(gate)
    )
    return {
        "loss/ce": avg(ce),
        "loss/bbox_smoothl1": avg(sl1),
        "loss/bbox_ciou": avg(cious),
        "loss/coord_gate": avg(gate),
        "loss/coord_ce": avg(cce),
        "loss/coord_el1": avg(el1),
        "loss/coord_ehuber": avg(eh),
        "loss/coord_entropy": avg(ent),
        "loss/coord_reg": reg,
        "loss/total": total,
    }


NORMS = ["per_sample", "per_pack_token_mean"]


@pytest.mark.parametrize("normalization", NORMS)
def test_hand_computed_example_matches(normalization):
    # Two samples of different sizes, so the two rules give different numbers.
    b = collate_pack(
        [
            make_segment(20, prompt_len=3, n_boxes=1, group="prefix", channel="B"),
            make_segment(21, prompt_len=4, n_boxes=2, text_per_box=3, group="fn", channel="B"),
        ]
    )
    # Sharpen a few coord rows so the Huber branch and the expectation both move away from 0.5.
    logits = _logits(b, seed=3, dtype=torch.float64)
    for slot, k in zip((b.coord_pos - 1).tolist(), b.coord_bins.tolist()):
        logits[0, slot, COORD_IDS[k]] += 6.0
    _, parts = pack_loss(logits, logits, b, COORD_IDS, ALL_ON, normalization)
    ref = _reference(logits, b, ALL_ON, normalization)
    for key, value in ref.items():
        assert parts[key] == pytest.approx(value, abs=1e-6), key
    other = _reference(logits, b, ALL_ON, NORMS[1 - NORMS.index(normalization)])
    assert abs(other["loss/total"] - ref["loss/total"]) > 1e-3  # the example tells the rules apart


@pytest.mark.parametrize("normalization", NORMS)
def test_fp32_matches_float64_reference(normalization):
    b = _batch()
    logits = _logits(b, seed=5, dtype=torch.float32)
    _, parts = pack_loss(logits, logits, b, COORD_IDS, ALL_ON, normalization)
    ref = _reference(logits.double(), b, ALL_ON, normalization)
    for key, value in ref.items():
        assert parts[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


@pytest.mark.parametrize("delta", [0.001, 0.05])
def test_huber_value_and_gradient_on_both_sides_of_delta(delta):
    """0.5·d²/δ inside δ (slope d/δ), |d| − δ/2 outside (slope ±1): the predecessor's expected-Huber."""
    d = torch.tensor(
        [-3 * delta, -0.5 * delta, -0.1 * delta, 0.25 * delta, 0.9 * delta, 1.5 * delta, 0.7],
        dtype=torch.float64,
        requires_grad=True,
    )
    value = huber(d, delta)
    value.sum().backward()
    for x, v, g in zip(d.detach().tolist(), value.tolist(), d.grad.tolist()):
        inside = abs(x) < delta
        assert v == pytest.approx(0.5 * x * x / delta if inside else abs(x) - delta / 2, rel=1e-12, abs=1e-15), x
        assert g == pytest.approx(x / delta if inside else math.copysign(1.0, x), rel=1e-12), x
    at = torch.tensor([delta], dtype=torch.float64)
    assert float(huber(at, delta)) == pytest.approx(delta / 2)  # continuous at δ: both branches give δ/2


def test_expected_huber_term_gradient_matches_the_formula():
    """d/dz_k of Σ_j q_j·huber(j/999 − gt) is q_k·(h_k − E_q[h]) / τ, bins inside and outside δ alike."""
    b = _batch()
    w = LossWeights(**{**ALL_ON.__dict__, "coord_ehuber_weight": 1.0, "coord_huber_delta": 0.05})
    logits = _logits(b, seed=7, dtype=torch.float64).requires_grad_(True)
    _, parts = pack_loss(logits, logits, b, COORD_IDS, w)
    slot_rows = (b.coord_pos - 1).tolist()
    z = logits[0, slot_rows][:, COORD_IDS]
    from toolkit.trainer.losses import _coord_terms  # the term alone, without the other losses' gradients

    eh = _coord_terms(logits[0], b, torch.tensor(COORD_IDS), w)["ehuber"]
    (grad,) = torch.autograd.grad(eh, logits)
    tau, n = w.softctx_temperature, len(slot_rows)
    for r, (row, k) in enumerate(zip(slot_rows, b.coord_bins.tolist())):
        q = torch.softmax(z[r].detach() / tau, dim=-1)
        errs = (torch.arange(1000, dtype=torch.float64) / 999 - k / 999).abs()
        h = torch.where(errs < 0.05, 0.5 * errs**2 / 0.05, errs - 0.025)
        assert (errs < 0.05).any() and (errs >= 0.05).any()
        want = q * (h - (q * h).sum()) / tau / n
        assert torch.allclose(grad[0, row, COORD_IDS], want, rtol=1e-9, atol=1e-15), r
    assert parts["loss/coord_ehuber"] == pytest.approx(float(eh.detach()), rel=1e-12)


def test_ciou_alpha_is_detached_same_value_other_gradient():
    """Differs from the predecessor (α with gradient): the value is the same, the gradient is that of
    IoU − ρ²/c² − α·v with α held constant (as torchvision's complete_box_iou_loss)."""
    gt = torch.tensor([[0.2, 0.1, 0.6, 0.7]], dtype=torch.float64)
    start = torch.tensor([[0.25, 0.2, 0.5, 0.5]], dtype=torch.float64)

    def ciou_with(alpha_grad: bool, pred):
        x1, y1, x2, y2 = pred[:, 0], pred[:, 1], pred[:, 2], pred[:, 3]
        gx1, gy1, gx2, gy2 = gt[:, 0], gt[:, 1], gt[:, 2], gt[:, 3]
        inter = (torch.minimum(x2, gx2) - torch.maximum(x1, gx1)).clamp(min=0) * (
            torch.minimum(y2, gy2) - torch.maximum(y1, gy1)
        ).clamp(min=0)
        eps = 1e-7
        iou = inter / ((x2 - x1) * (y2 - y1) + (gx2 - gx1) * (gy2 - gy1) - inter + eps)
        c2 = (torch.maximum(x2, gx2) - torch.minimum(x1, gx1)) ** 2 + (
            torch.maximum(y2, gy2) - torch.minimum(y1, gy1)
        ) ** 2
        rho2 = ((x1 + x2 - gx1 - gx2) ** 2 + (y1 + y2 - gy1 - gy2) ** 2) / 4
        v = (
            4
            / math.pi**2
            * (torch.atan((gx2 - gx1) / (gy2 - gy1 + eps)) - torch.atan((x2 - x1) / (y2 - y1 + eps))) ** 2
        )
        alpha = v / (1 - iou + v + eps)
        alpha = alpha if alpha_grad else alpha.detach()
        return iou - rho2 / (c2 + eps) - alpha * v

    grads = {}
    for name, fn in (
        ("ours", lambda p: complete_iou(p, gt)),
        ("detached", lambda p: ciou_with(False, p)),
        ("predecessor", lambda p: ciou_with(True, p)),
    ):
        pred = start.clone().requires_grad_(True)
        value = fn(pred)
        (1 - value).sum().backward()
        grads[name] = (float(value.detach()), pred.grad.clone())
    assert grads["ours"][0] == pytest.approx(grads["predecessor"][0], rel=1e-12)
    assert torch.allclose(grads["ours"][1], grads["detached"][1], rtol=1e-10, atol=1e-12)
    assert (grads["ours"][1] - grads["predecessor"][1]).abs().max() > 1e-4
