"""Post-rollout packing: choose which segments share one forward, and collate them into one row.

Owns pack selection (FIFO baseline vs. a `binpacking` candidate), pack planning (`plan_packs`, and
`RoundPacker`, which the trainer packs every step with, one round or several), and `PackBatch`
(the one-row, padding-free tensor batch that losses and Channel-A read). Imports torch and binpacking
inside functions only; selection itself is pure Python.

Packed attention: `collate_pack` restarts `position_ids` at 0 for every segment and never returns an
attention mask. transformers (5.19, `masking_utils._preprocess_mask_arguments` →
`find_packed_sequence_indices`) derives a block-causal mask from such position ids for sdpa, eager
and flex attention, and flash-attention uses them as varlen boundaries, **but only when
`attention_mask is None` and `past_key_values is None`**. A forward with the default `use_cache`
(config.use_cache=True) creates a DynamicCache first, which silently disables the packed mask and
lets segments attend to each other. So every packed forward must pass `use_cache=False`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from itertools import repeat
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from toolkit.data.segment import Segment

BOX_GROUP_IDS = {"prefix": 0, "fn": 1}

_OVERSIZE_MITIGATIONS = (
    "Mitigations: increase global_max_length, reduce rollout_matching.max_new_tokens, "
    "or drop samples longer than the pack capacity before packing."
)


def _check_lengths(lengths: Sequence[int], capacity: int) -> None:
    if capacity <= 0:
        raise ValueError(f"packing_length must be > 0, got {capacity}")
    for i, n in enumerate(lengths):
        if n <= 0:
            raise ValueError(f"segment {i} has encoded_len={n}; segments must hold at least one token")
        if n > capacity:
            raise ValueError(
                f"post-rollout packing cannot fit a single segment: encoded_len={n} > packing_length={capacity} "
                f"(segment index {i}). {_OVERSIZE_MITIGATIONS}"
            )


def _fifo_baseline(lengths: Sequence[int], capacity: int) -> list[int]:
    selected, total = [0], lengths[0]
    for i in range(1, len(lengths)):
        if total + lengths[i] <= capacity:
            selected.append(i)
            total += lengths[i]
    return selected


def _binpacking_candidate(lengths: Sequence[int], capacity: int) -> list[int]:
    try:
        import binpacking
    except ImportError as exc:  # a declared dependency; keep the message actionable anyway
        raise ImportError("post-rollout packing needs the `binpacking` package: pip install binpacking") from exc
    room = capacity - lengths[0]
    rest = {i: lengths[i] for i in range(1, len(lengths)) if lengths[i] <= room}
    if not rest:
        return [0]
    bins = [sorted(b) for b in binpacking.to_constant_volume(rest, room) if b]
    # Largest fill, then fewest items, then lexicographically smallest indices: deterministic.
    best = min(bins, key=lambda idx: (-sum(lengths[i] for i in idx), len(idx), idx))
    return [0] + best


def select_pack(lengths: Sequence[int], capacity: int) -> list[int]:
    """Indices (ascending = insertion order) of the segments that go into the next pack.

    The oldest segment (index 0) is always included. The FIFO-greedy baseline adds later segments that
    still fit; a `binpacking.to_constant_volume` candidate over the rest (oldest pinned) replaces it only
    when its total length is strictly larger, so a pack is never fuller under FIFO than what we choose.

    Raises:
        ValueError: a length is ≤ 0 or larger than `capacity` (message names encoded_len and packing_length).
    """
    if not lengths:
        return []
    _check_lengths(lengths, capacity)
    baseline = _fifo_baseline(lengths, capacity)
    candidate = _binpacking_candidate(lengths, capacity)
    if sum(lengths[i] for i in candidate) > sum(lengths[i] for i in baseline):
        return candidate
    return baseline


def plan_packs(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Split all segments into packs by repeated `select_pack`; every index appears exactly once."""
    _check_lengths(lengths, capacity)
    remaining = list(range(len(lengths)))
    packs: list[list[int]] = []
    while remaining:
        chosen = select_pack([lengths[i] for i in remaining], capacity)
        packs.append([remaining[j] for j in chosen])
        keep = set(chosen)
        remaining = [r for j, r in enumerate(remaining) if j not in keep]
    return packs


@dataclass
class PackBatch:
    """One padding-free row holding `n_segments` segments back to back.

    input_ids:  [1, L] long.
    position_ids: [1, L] long, restarting at 0 for every segment; for a VLM [4, 1, L]: those text
                positions on top of the three M-RoPE rows (toolkit/vlm/mrope.py).
    ce_weights: [1, L] float32, label-aligned (weight of predicting token t from the logits at t-1).
    coord_pos:  [N] long, global label positions of coordinate slots (4 per box, x1, y1, x2, y2).
    coord_bins: [N] long, ground-truth bins 0..999.
    box_group:  [N/4] long, 0 = matched rollout prefix, 1 = FN-appended / Channel-A object.
    seq_lens:   [S] long, segment lengths in order.
    n_segments: S.  channel: "A" or "B" (channels never share a pack).
    images:     the segments' image paths in order (the loss turns them into pixel inputs).
    image_grids: their (t, h, w) grids, same order.
    pixels:     those images' pixel inputs joined, when every image segment carries its own (the HF
                rollouts patched them); None: the loss patches `images`.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    ce_weights: torch.Tensor
    coord_pos: torch.Tensor
    coord_bins: torch.Tensor
    box_group: torch.Tensor
    seq_lens: torch.Tensor
    n_segments: int
    channel: str
    images: tuple[str, ...] = ()
    image_grids: tuple[tuple[int, int, int], ...] = ()
    pixels: dict | None = field(default=None, compare=False, repr=False)  # tensors: kept out of == and repr

    @property
    def length(self) -> int:
        """Tokens in the pack (L)."""
        return int(self.input_ids.shape[-1])

    total_len = length

    @cached_property
    def logit_rows(self) -> torch.Tensor:
        """The rows whose logits the loss reads, ascending: those predicting a supervised label (CE weight > 0)
        or a coordinate slot. The learner computes logits only there (`logits_to_keep`): the rows of a
        prompt and of its image are never read. Never empty: row 0 keeps a pack without supervision in the graph.
        Computed once per pack (a host sync): the forward and both loss terms read it; packs are not changed
        after collation."""
        import torch

        w = self.ce_weights[0, 1:]
        rows = torch.cat([torch.nonzero(w).flatten(), self.coord_pos.to(w.device) - 1]).unique(sorted=True)
        return rows if rows.numel() else torch.zeros(1, dtype=torch.long, device=w.device)

    def to(self, device: Any) -> PackBatch:
        """A copy with every tensor on `device`."""
        import torch

        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in moved.items()}
        return PackBatch(**moved)


def _check_segment_for_packing(seg: Segment, index: int) -> None:
    # Label position 0 of a segment would be predicted from the previous segment's last token once
    # packed, so it must be unsupervised; coord slots need p-1 inside the same segment for the same reason.
    if seg.ce_weights and seg.ce_weights[0] != 0:
        raise ValueError(
            f"segment {index} ({seg.sample_id!r}): ce_weights[0] must be 0 (nothing predicts the first token)"
        )
    if seg.coord_pos and min(seg.coord_pos) < 1:
        raise ValueError(f"segment {index} ({seg.sample_id!r}): coord slot at position 0 has no predicting token")
    bad = [g for g in seg.box_groups if g not in BOX_GROUP_IDS]
    if bad:
        raise ValueError(f"segment {index} ({seg.sample_id!r}): box_groups must be 'prefix' or 'fn', got {bad[0]!r}")


def _check_pack(segments: Sequence[Segment], capacity: int | None) -> None:
    """At least one segment, one channel, and no more tokens than `capacity`."""
    if not segments:
        raise ValueError("collate_pack needs at least one segment")
    channels = {s.channel for s in segments}
    if len(channels) != 1:
        raise ValueError(f"channels never share a pack; got segments from {sorted(channels)}")
    total = sum(len(s) for s in segments)
    if capacity is not None and total > capacity:
        raise ValueError(f"pack holds {total} tokens > packing_length={capacity}. {_OVERSIZE_MITIGATIONS}")


def collate_pack(
    segments: Sequence[Segment], capacity: int | None = None, mrope: tuple[int, int] | None = None
) -> PackBatch:
    """Concatenate segments into one `PackBatch` (CPU tensors; move with `.to(device)`).

    `mrope`: (image pad id, spatial merge size) for a Qwen-VL model: position ids become the four rows of
    toolkit/vlm/mrope.py, also for text-only packs (the text row is what keeps segments apart).

    Raises:
        ValueError: no segments, mixed channels, total length above `capacity`, or a segment whose first
            token is supervised / whose coord slot sits at position 0.
    """
    import numpy as np
    import torch

    _check_pack(segments, capacity)
    ids: list[int] = []
    weights: list[float] = []
    coord_pos: list[int] = []
    coord_bins: list[int] = []
    groups: list[int] = []
    for index, seg in enumerate(segments):
        _check_segment_for_packing(seg, index)
        offset = len(ids)
        ids.extend(seg.input_ids)
        weights.extend(map(float, seg.ce_weights))
        coord_pos.extend(map(operator.add, repeat(offset), seg.coord_pos))  # offset + p, in C
        coord_bins.extend(seg.coord_bins)
        groups.extend(BOX_GROUP_IDS[g] for g in seg.box_groups)

    # Tensors through numpy arrays: the same values, several times cheaper than torch.tensor on long Python lists.
    def longs(values) -> torch.Tensor:
        return torch.from_numpy(np.array(values, dtype=np.int64))

    if mrope is not None:
        from toolkit.vlm.mrope import packed_mrope

        rows = packed_mrope([(s.input_ids, s.image_grids) for s in segments], *mrope)
        position_ids = torch.tensor(rows, dtype=torch.long)[:, None, :]
    else:
        position_ids = torch.from_numpy(np.concatenate([np.arange(len(s), dtype=np.int64) for s in segments]))[None]
    return PackBatch(
        input_ids=longs(ids)[None],
        position_ids=position_ids,
        # float64 then float32: the same rounding as converting each float to float32, a quarter faster
        ce_weights=torch.from_numpy(np.array(weights, dtype=np.float64).astype(np.float32))[None],
        coord_pos=longs(coord_pos),
        coord_bins=longs(coord_bins),
        box_group=longs(groups),
        seq_lens=longs([len(s) for s in segments]),
        n_segments=len(segments),
        channel=segments[0].channel,
        images=tuple(p for s in segments for p in s.images),
        image_grids=tuple(g for s in segments for g in s.image_grids),
        pixels=_joined_pixels(segments),
    )


def _joined_pixels(segments: Sequence[Segment]) -> dict | None:
    """The pack's pixel inputs from its segments' own, if every image segment has them (else None)."""
    parts = [s.pixels for s in segments if s.images]
    if not parts or any(p is None for p in parts):
        return None
    from toolkit.vlm.inputs import join_pixels

    return join_pixels(parts)


class RoundPacker:
    """Post-rollout packing of a step's segments as they arrive in rounds — the trainer's one packing path.

    Each round's segments join a buffer; while the buffer holds ≥ min_fill·capacity tokens a pack is
    cut with `select_pack` (the choice `plan_packs` makes) and the rest is carried into the next round;
    the step's last round (or `flush()`) packs what is left. Packs depend only on the rounds, never on
    timing, so overlapped and serial execution pack alike, and a one-round step (Channel-A, or rollouts
    decoded in one call) packs exactly like `plan_packs` over the whole step. packing off: one pack per
    segment, at once.
    """

    def __init__(self, capacity: int, min_fill: float, packing: bool = True, mrope: tuple[int, int] | None = None):
        self.capacity, self.min_fill, self.packing, self.mrope = capacity, min_fill, packing, mrope
        self.buffer: list = []

    def add(self, segments: list, last: bool = False) -> list:
        """The packs ready once `segments` joined the buffer; `last`: the step's final round, pack everything."""
        self.buffer += segments
        if not self.packing:
            return self.flush()
        packs = []
        while sum(len(s) for s in self.buffer) >= self.min_fill * self.capacity:
            chosen = set(select_pack([len(s) for s in self.buffer], self.capacity))
            packs.append(collate_pack([s for i, s in enumerate(self.buffer) if i in chosen], mrope=self.mrope))
            self.buffer = [s for i, s in enumerate(self.buffer) if i not in chosen]
        return packs + self.flush() if last else packs

    def flush(self) -> list:
        """Pack what the buffer holds (`plan_packs`, or one pack per segment) and empty it."""
        if self.packing:
            plan = plan_packs([len(s) for s in self.buffer], self.capacity)
        else:
            plan = [[i] for i in range(len(self.buffer))]
        packs = [collate_pack([self.buffer[i] for i in idx], mrope=self.mrope) for idx in plan]
        self.buffer = []
        return packs
