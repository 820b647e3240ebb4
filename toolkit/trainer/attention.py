"""`model.attn_impl: sdpa_packed`: scaled-dot-product attention run segment by segment over a packed row.

Why it exists: a pack is one row whose `position_ids` restart at 0 for every segment
(toolkit/trainer/packing.py). transformers' own `sdpa` turns that into a dense [L, L] block-causal mask,
so a pack of L tokens pays L² attention however many segments it holds (docs/PERFORMANCE.md, item 1).
Here each segment runs causal SDPA on its own slice, Σ lᵢ² instead of L², with the segment rule
transformers uses for its mask (a new segment wherever the position does not go up by one), so the
result is the one of each segment forwarded alone.

Everything that is not a packed training forward (generate with a padding mask or a KV cache, a
single sequence, vision towers, which pass no `position_ids`) goes to transformers' `sdpa` unchanged.
`register()` must run before a model is loaded with this name; the model loaders call it.
"""

from __future__ import annotations

import weakref

import torch

NAME = "sdpa_packed"


def register() -> None:
    """Make `attn_implementation="sdpa_packed"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, packed_mask)


def segment_spans(position_ids: torch.Tensor | None, q_len: int, kv_len: int, has_mask: bool) -> list | None:
    """Per batch row, the (start, end) of each packed segment; None when this is no packed forward."""
    if has_mask or position_ids is None or position_ids.dim() != 2 or q_len != kv_len:
        return None
    return _spans_of(position_ids)


_last: tuple = (None, None)  # (weak reference to a position_ids tensor, its spans)


def _spans_of(position_ids: torch.Tensor) -> list | None:
    """The spans of `position_ids`, computed once per forward: every layer gets the same tensor, and each
    computation is a host sync (on a GPU, one per layer would stall the queue)."""
    global _last
    ref, spans = _last
    if ref is not None and ref() is position_ids:
        return spans
    starts = torch.diff(position_ids, dim=-1) != 1
    spans = None
    if bool(starts.any()):
        spans = []
        for row in starts:
            cuts = [0, *(torch.nonzero(row).flatten() + 1).tolist(), position_ids.shape[-1]]
            spans.append(list(zip(cuts, cuts[1:])))
    _last = (weakref.ref(position_ids), spans)
    return spans


def packed_attention(module, query, key, value, attention_mask, position_ids=None, sliding_window=None, **kwargs):
    """transformers attention function: [B, H, L, D] query/key/value → ([B, L, H, D] output, None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if sliding_window is not None:
        raise ValueError(
            f"model.attn_impl: {NAME} does not support sliding-window attention layers; set model.attn_impl: sdpa"
        )
    spans = segment_spans(position_ids, query.shape[2], key.shape[2], attention_mask is not None)
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def one(b: int, start: int, end: int) -> torch.Tensor:
        q, k, v = (t[b : b + 1, :, start:end] for t in (query, key, value))
        return sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]

    rows = [torch.cat([one(b, start, end) for start, end in row], dim=1) for b, row in enumerate(spans)]
    return torch.cat(rows, dim=0), None


def packed_mask(*, attention_mask=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, **kwargs):
    """transformers mask function: no mask where `packed_attention` needs none (no padding, no cache offset:
    causality and segments come from the position ids there); transformers' sdpa mask everywhere else."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(
        attention_mask=attention_mask,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        **kwargs,
    )
