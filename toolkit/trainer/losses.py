"""Per-pack loss: token CE, coordinate geometry (smooth-L1 + CIoU on the expected box), optional
coord-distribution regularizers, and the coord-vocabulary gate.

Owns `LossWeights`, `pack_loss` and the normalization rules (`NORMALIZATIONS`). A pack's loss is a mean
over its samples, so the trainer weights it by its sample share n_segments / N_raw (toolkit/trainer/step.py):

- `per_sample` (default): each term is first a mean within each sample (CE over that sample's CE
  weights, geometry over its slots / boxes), then the pack's samples are averaged. The step objective is
  then (1/N_raw) Σ_samples loss_sample, whatever the packing, server rounds or rank split.
- `per_pack_token_mean` (the predecessor's rule, for reproducing old runs): each term is a mean over the
  whole pack's tokens / slots / boxes, so the objective changes with how samples fall into packs.

See docs/METRICS_LOSSES.md §1 for why. Imports torch inside functions only.

Conventions (toolkit/data/segment.py): label position t is predicted by the logits at t-1; coordinate
bin k is the normalized value k/999; `coord_token_ids[k]` is the token id of bin k.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from toolkit.trainer.packing import PackBatch

NUM_BINS = 1000
NORMALIZATIONS = ("per_sample", "per_pack_token_mean")
PART_KEYS = (
    "loss/ce",
    "loss/bbox_smoothl1",
    "loss/bbox_ciou",
    "loss/coord_gate",
    "loss/coord_ce",
    "loss/coord_el1",
    "loss/coord_ehuber",
    "loss/coord_entropy",
    "loss/coord_reg",
    "loss/coord_prefix",
    "loss/coord_tail",
    "loss/total",
)
_NONNEGATIVE = (
    "bbox_smoothl1_weight",
    "bbox_ciou_weight",
    "coord_ce_weight",
    "coord_el1_weight",
    "coord_ehuber_weight",
    "coord_gate_weight",
)


@dataclass(frozen=True)
class LossWeights:
    """Loss weights read from the `stage2_ab` config section (desc CE weight lives in the segments' ce_weights).

    coord_entropy_weight may be negative: +w penalizes entropy (sharpens the coord distribution),
    -w rewards it. coord_huber_delta and softctx_temperature must be > 0.
    """

    bbox_smoothl1_weight: float = 1.0
    bbox_ciou_weight: float = 1.0
    coord_ce_weight: float = 0.0
    coord_el1_weight: float = 0.0
    coord_ehuber_weight: float = 0.0
    coord_huber_delta: float = 0.001
    coord_entropy_weight: float = 0.0
    coord_gate_weight: float = 1.0
    softctx_temperature: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                problems.append(f"{f.name} must be a finite number, got {v!r}")
            elif f.name in _NONNEGATIVE and v < 0:
                problems.append(f"{f.name} must be >= 0, got {v}")
            elif f.name in ("coord_huber_delta", "softctx_temperature") and v <= 0:
                problems.append(f"{f.name} must be > 0, got {v}")
        if problems:
            raise ValueError("invalid stage2_ab loss weights: " + "; ".join(problems))

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> LossWeights:
        """Build from the resolved `stage2_ab` section; other keys (schedule, n_softctx_iter, ...) are ignored.

        Raises:
            KeyError: a loss key is missing (defaults belong to the config schema, not here).
            ValueError: a value is negative where it must not be, or not finite.
        """
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise KeyError(f"stage2_ab section is missing loss keys: {', '.join('stage2_ab.' + m for m in missing)}")
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for softmax math; fp32/fp64 stay as they are."""
    import torch

    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def expectation_decode(coord_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Expected normalized coordinate Σ_k softmax(z/τ)_k · k/999 over the last dim (1000 coord logits)."""
    import torch

    z = _upcast(coord_logits)
    unit = torch.arange(NUM_BINS, device=z.device, dtype=z.dtype) / (NUM_BINS - 1)
    return torch.softmax(z / temperature, dim=-1) @ unit


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _canonical(box: torch.Tensor, clamp: bool) -> tuple[torch.Tensor, ...]:
    import torch

    x1, x2 = torch.minimum(box[:, 0], box[:, 2]), torch.maximum(box[:, 0], box[:, 2])
    y1, y2 = torch.minimum(box[:, 1], box[:, 3]), torch.maximum(box[:, 1], box[:, 3])
    if clamp:
        x1, y1, x2, y2 = (t.clamp(0.0, 1.0) for t in (x1, y1, x2, y2))
    return x1, y1, x2, y2


def complete_iou(pred: torch.Tensor, gt: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """CIoU per box for [B, 4] xyxy boxes in [0, 1]; pred is canonicalized (min/max) and clamped first.

    CIoU = IoU − ρ²/c² − α·v, v = 4/π²·(atan(w_g/h_g) − atan(w_p/h_p))², α = v / (1 − IoU + v) taken
    without gradient (as torchvision does).
    """
    import torch

    px1, py1, px2, py2 = _canonical(pred, clamp=True)
    gx1, gy1, gx2, gy2 = _canonical(gt, clamp=False)
    inter = (torch.minimum(px2, gx2) - torch.maximum(px1, gx1)).clamp(min=0) * (
        torch.minimum(py2, gy2) - torch.maximum(py1, gy1)
    ).clamp(min=0)
    pw, ph, gw, gh = px2 - px1, py2 - py1, gx2 - gx1, gy2 - gy1
    iou = inter / (pw * ph + gw * gh - inter + eps)
    cw = torch.maximum(px2, gx2) - torch.minimum(px1, gx1)
    ch = torch.maximum(py2, gy2) - torch.minimum(py1, gy1)
    rho2 = ((px1 + px2 - gx1 - gx2) ** 2 + (py1 + py2 - gy1 - gy2) ** 2) / 4
    v = (4 / math.pi**2) * (torch.atan(gw / (gh + eps)) - torch.atan(pw / (ph + eps))) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return iou - rho2 / (cw**2 + ch**2 + eps) - alpha * v


class _Means:
    """Weighted means of per-token / per-slot / per-box values of one pack under a normalization rule.

    `mean(values, positions, weights)`: `positions` are the values' label positions in the pack (a box
    counts at its first slot). per_pack_token_mean: Σw·v / Σw over the pack. per_sample: the same within
    each sample, then the plain mean over the pack's samples (a sample with nothing to average adds 0).
    """

    def __init__(self, batch: PackBatch, normalization: str, device):
        import torch

        if normalization not in NORMALIZATIONS:
            raise ValueError(f"loss normalization must be one of {'|'.join(NORMALIZATIONS)}, got {normalization!r}")
        self.per_sample = normalization == "per_sample"
        self.n = int(batch.n_segments)
        lens = batch.seq_lens.to(device)
        self.sample_of = torch.repeat_interleave(torch.arange(len(lens), device=device), lens)

    def mean(self, values: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        if values.numel() == 0:
            return torch.zeros((), device=values.device, dtype=values.dtype)
        w = torch.ones_like(values) if weights is None else weights.to(values.dtype)
        if not self.per_sample:
            return (values * w).sum() / w.sum()
        owner = self.sample_of.index_select(0, positions)
        num = torch.zeros(self.n, device=values.device, dtype=values.dtype).index_add(0, owner, values * w)
        den = torch.zeros(self.n, device=values.device, dtype=values.dtype).index_add(0, owner, w)
        # den = 0 only where num = 0: divide by 1 there, never 0/0 (a NaN gradient through torch.where).
        return (num / torch.where(den > 0, den, torch.ones_like(den))).sum() / self.n


def _same_rows(positions: torch.Tensor) -> torch.Tensor:
    """Pack rows → logits rows when the logits cover every position."""
    return positions


def _ce_term(logits: torch.Tensor, batch: PackBatch, means: _Means, row_of=_same_rows) -> torch.Tensor:
    """Σ w·CE / Σ w over supervised labels (per sample or per pack); 0 when nothing is supervised.
    `row_of` maps pack rows to rows of `logits` (`_as_2d`)."""
    import torch
    import torch.nn.functional as F

    w = batch.ce_weights[0, 1:].to(logits.device)
    # nonzero() is a host sync; it buys a [n_sup, V] fp32 slice instead of a full [L, V] fp32 copy.
    rows = torch.nonzero(w).squeeze(1)
    if rows.numel() == 0:
        return torch.zeros((), device=logits.device)
    w_sup = w.index_select(0, rows)
    labels = batch.input_ids[0, 1:].to(logits.device).index_select(0, rows)
    # Cost: n_sup × V × 4 bytes for the fp32 rows, the same again for log-softmax saved for backward.
    token_ce = F.cross_entropy(_upcast(logits.index_select(0, row_of(rows))), labels, reduction="none")
    return means.mean(token_ce, rows + 1, w_sup)  # row r predicts label position r + 1


def _coord_terms(
    logits: torch.Tensor,
    batch: PackBatch,
    coord_ids: torch.Tensor,
    weights: LossWeights,
    means: _Means | None = None,
    row_of=_same_rows,
) -> dict:
    """Geometry, regularizers and gate over the pack's coord slots (all zero when there are none)."""
    import torch
    import torch.nn.functional as F

    dev = logits.device
    zero = torch.zeros((), device=dev)
    names = ("sl1", "ciou", "gate", "coord_ce", "el1", "ehuber", "entropy", "prefix", "tail")
    out = dict.fromkeys(names, zero)
    slots = batch.coord_pos.to(dev)
    if slots.numel() == 0:
        return out
    if slots.numel() % 4:
        raise ValueError(f"pack has {slots.numel()} coord slots; need 4 per box")
    means = means or _Means(batch, "per_sample", dev)
    first = slots[0::4]  # a box belongs where its first slot is
    # Only the N rows predicting coord slots: N × V × 4 bytes in fp32, never [L, V].
    full = _upcast(logits.index_select(0, row_of(slots - 1)))
    z = full.index_select(1, coord_ids)  # [N, 1000] coord slice
    log_p = torch.log_softmax(z / weights.softctx_temperature, dim=-1)
    p = log_p.exp()
    unit = torch.arange(NUM_BINS, device=dev, dtype=z.dtype) / (NUM_BINS - 1)
    c_hat = p @ unit  # expectation decode (= expectation_decode(z, τ)), not argmax
    bins = batch.coord_bins.to(dev)
    gt = bins.to(z.dtype) / (NUM_BINS - 1)

    sl1_slot = _finite_or_zero(F.smooth_l1_loss(c_hat, gt, beta=1.0, reduction="none"))
    ciou_box = _finite_or_zero(1.0 - complete_iou(c_hat.view(-1, 4), gt.view(-1, 4)))
    out["sl1"], out["ciou"] = means.mean(sl1_slot, slots), means.mean(ciou_box, first)
    group = batch.box_group.to(dev)
    for name, gid in (("prefix", 0), ("tail", 1)):  # logged only: the same means over one group's boxes
        in_box = group == gid
        in_slot = in_box.repeat_interleave(4)
        out[name] = weights.bbox_smoothl1_weight * means.mean(
            sl1_slot[in_slot], slots[in_slot]
        ) + weights.bbox_ciou_weight * means.mean(ciou_box[in_box], first[in_box])

    # Gate: -log of the probability mass the full-vocabulary softmax keeps on coord tokens.
    with torch.set_grad_enabled(torch.is_grad_enabled() and weights.coord_gate_weight != 0):
        out["gate"] = means.mean(torch.logsumexp(full, dim=-1) - torch.logsumexp(z, dim=-1), slots)
    if weights.coord_ce_weight != 0:
        out["coord_ce"] = means.mean(F.cross_entropy(z, bins, reduction="none"), slots)  # untempered
    if weights.coord_el1_weight != 0 or weights.coord_ehuber_weight != 0:
        err = (unit[None, :] - gt[:, None]).abs()  # [N, 1000]
        if weights.coord_el1_weight != 0:
            out["el1"] = means.mean((p * err).sum(-1), slots)
        if weights.coord_ehuber_weight != 0:
            out["ehuber"] = means.mean((p * huber(err, weights.coord_huber_delta)).sum(-1), slots)
    if weights.coord_entropy_weight != 0:
        out["entropy"] = means.mean(-(p * log_p).sum(-1), slots)
    return out


def huber(err: torch.Tensor, delta: float) -> torch.Tensor:
    """Huber of |d| with the predecessor's scale: 0.5·d²/δ for |d| < δ, else |d| − δ/2 (slope 1 outside δ,
    continuous with continuous slope at δ). Not δ·that: at the default δ = 0.001 a weight tuned on the
    predecessor would do 1000× less."""
    import torch

    a = err.abs()
    return torch.where(a < delta, 0.5 * a**2 / delta, a - 0.5 * delta)


def _as_2d(logits: torch.Tensor, batch: PackBatch, name: str):
    """(logits as [rows, V], row_of): the logits at every position ([L, V]), or only at `batch.logit_rows`
    (a forward with `logits_to_keep`), and the map from pack rows to rows of those logits."""
    import torch

    if logits.dim() == 3:
        if logits.shape[0] != 1:
            raise ValueError(f"{name}: packed forward must have batch size 1, got {tuple(logits.shape)}")
        logits = logits[0]
    if logits.dim() == 2 and logits.shape[0] == batch.length:
        return logits, _same_rows
    kept = batch.logit_rows.to(logits.device)
    if logits.dim() != 2 or logits.shape[0] != kept.numel():
        raise ValueError(
            f"{name}: model returned logits of shape {tuple(logits.shape)} for a pack of {batch.length} tokens; "
            f"the loss reads logits at every position or at the pack's {kept.numel()} logit_rows "
            "(logits_to_keep=pack.logit_rows)"
        )
    return logits, lambda positions: torch.searchsorted(kept, positions)


def _weighted_sum(ce: torch.Tensor, t: dict, weights: LossWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(coord_reg, total) from the CE term and the coordinate terms `t` (`_coord_terms`), weighted."""
    reg = (
        weights.coord_ce_weight * t["coord_ce"]
        + weights.coord_el1_weight * t["el1"]
        + weights.coord_ehuber_weight * t["ehuber"]
        + weights.coord_entropy_weight * t["entropy"]
    )
    total = (
        ce
        + weights.bbox_smoothl1_weight * t["sl1"]
        + weights.bbox_ciou_weight * t["ciou"]
        + reg
        + weights.coord_gate_weight * t["gate"]
    )
    return reg, total


def pack_loss(
    logits_ce: torch.Tensor,
    logits_geo: torch.Tensor,
    batch: PackBatch,
    coord_token_ids: Sequence[int] | torch.Tensor,
    weights: LossWeights,
    normalization: str = "per_sample",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one pack (a mean over its samples) and its logged parts.

    Args:
        logits_ce: [1, L, V] (or [L, V]) logits for the CE term (Channel-A: first soft-context pass), or
            [1, K, V] at the K rows of `batch.logit_rows` only (the learner's forwards, `logits_to_keep`).
        logits_geo: the same; logits for geometry, regularizers and gate (Channel-A: last pass).
        batch: the collated pack.
        coord_token_ids: 1000 token ids, entry k = bin k.
        weights: loss weights.
        normalization: `per_sample` | `per_pack_token_mean` (module docstring).

    Returns:
        (total, parts): `total` = CE + w_sl1·sl1 + w_ciou·ciou + coord_reg + w_gate·gate (a scalar with
        grad); `parts` holds every key of PART_KEYS as floats (one host sync for all of them).
        Raw terms are logged unweighted; coord_reg, coord_prefix, coord_tail and total are weighted.
    """
    import torch

    lce, ce_rows = _as_2d(logits_ce, batch, "logits_ce")
    lgeo, geo_rows = _as_2d(logits_geo, batch, "logits_geo")
    coord_ids = torch.as_tensor(coord_token_ids, dtype=torch.long, device=lgeo.device)
    if coord_ids.shape != (NUM_BINS,):
        raise ValueError(
            f"coord_token_ids must hold {NUM_BINS} ids (bin k at index k), got shape {tuple(coord_ids.shape)}"
        )

    means = _Means(batch, normalization, lgeo.device)
    ce = _ce_term(lce, batch, means, ce_rows)
    t = _coord_terms(lgeo, batch, coord_ids, weights, means, geo_rows)
    reg, total = _weighted_sum(ce.to(lgeo.device), t, weights)
    if torch.is_grad_enabled() and not total.requires_grad and lgeo.requires_grad:
        # Nothing supervised in this pack: keep the graph so every rank still runs a (zero) backward.
        total = total + 0.0 * lgeo[:1, :1].float().sum()
    values = (
        ce,
        t["sl1"],
        t["ciou"],
        t["gate"],
        t["coord_ce"],
        t["el1"],
        t["ehuber"],
        t["entropy"],
        reg,
        t["prefix"],
        t["tail"],
        total,
    )
    # One host sync (.tolist) for all logged values instead of one .item() per key.
    logged = torch.stack([v.detach().double().to(lgeo.device) for v in values]).tolist()
    return total, dict(zip(PART_KEYS, logged))
