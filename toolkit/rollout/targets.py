"""Teacher-forced targets: FN-append and the Channel-A / Channel-B `Segment`s.

Owns which assistant token gets which CE weight and which coordinate slots get which GT bins. Pure
Python + the codec; imports nothing heavy. A rollout that cannot be trained gives a `Drop`, never an
exception; exceptions are reserved for caller bugs (invalid GT, a match that does not fit the parse).

Supervision rules (character spans come from the parser's per-token frame):
- A coordinate slot is a label position whose token id is a coord token. Coord tokens never get CE.
- A token belongs to a character span iff its own span overlaps it; a token whose text is empty
  (a partial UTF-8 byte) is taken to span the one character that completes it.
- Channel-B prefix: CE 1 on a token iff it overlaps a *matched* object's span (key's opening quote
  through the value's `}`) and overlaps no matched object's desc content. So a token straddling a
  matched and an FP object (`"]}, "`) is supervised; the opening `{`, FP objects, dropped objects and
  separators owned by no matched object are not. Geometry: the matched object's 4 coord slots get the
  matched GT's bins (group "prefix").
- Channel-B tail (FN entries, `}`, `<|im_end|>`) and the whole Channel-A answer: every non-coord token
  is supervised. Priority: the closure tokens (the one holding the outermost `}`, and `<|im_end|>`)
  get exactly 1; else a token overlapping a desc content gets `desc_ce_weight`; else it is structure and
  gets the struct multiplier (Channel-B only: `drop_invalid_struct_ce_multiplier` clamped to [1, 4]
  when the parse dropped any object, else 1). Every tail coord token is a slot (group "fn").
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from toolkit.data.render import FIELD_ORDERS, canonical_order, render_answer, render_entries
from toolkit.data.segment import Segment
from toolkit.rollout.input_checks import check_gt, check_match
from toolkit.rollout.match import MatchResult
from toolkit.rollout.parse import DROP_REASONS, ParseResult, canonical_value, continue_canonical
from toolkit.rollout.scan import ObjectScan, fields_of, scan_object
from toolkit.rollout.token_spans import coord_positions, paint, span_lists, token_bounds, token_ranges

Span = tuple[int, int]


@dataclass
class Drop:
    """A sample that cannot be trained. `reason` is a short slug (metric-key safe); `meta` holds the
    parse/match counters computed before the drop so metrics still see the rollout."""

    reason: str
    sample_id: str = ""
    detail: str = ""
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# FN append


def fn_append_fragment(
    prefix_text: str, fn_objects: Sequence[Mapping], start_index: int, field_order: str = "desc_first"
) -> str:
    """The text appended after an append-ready prefix: `[, ]"object_n": {...}, ...}` or just `}`.

    The leading ", " is added iff the prefix already has entries and does not end with ",". Objects
    are numbered from `start_index` in the given order with `field_order`.

    Raises:
        ValueError: when the prefix is not append-ready (rstrip must end with `{`, `}` or `,` at member
            level of an open top-level object, outside any string), or ends with "," and there is
            nothing to append, or `start_index` < 1.
    """
    return _fragment(prefix_text, _prefix_scan(prefix_text), fn_objects, start_index, field_order)


def _prefix_scan(prefix_text: str) -> ObjectScan | None:
    brace = prefix_text.find("{")
    return scan_object(prefix_text, brace) if brace >= 0 else None


def _fragment(
    prefix_text: str, scan: ObjectScan | None, fn_objects: Sequence[Mapping], start_index: int, field_order: str
) -> str:
    """`fn_append_fragment` given `_prefix_scan(prefix_text)`."""
    if field_order not in FIELD_ORDERS:
        raise ValueError(f"object_field_order must be one of {FIELD_ORDERS}, got {field_order!r}")
    if start_index < 1:
        raise ValueError(f"FN numbering must start at >= 1, got {start_index}")
    stripped = prefix_text.rstrip()
    last = stripped[-1:] or "<empty>"
    if last not in "{},":
        raise ValueError(f"rollout prefix is not append-ready; last_char={last!r} (expected '{{', '}}' or ',')")
    if scan is None or scan.status != "open" or scan.state not in ("key_or_close", "key", "after"):
        where = "no '{'" if scan is None else f"scan status={scan.status}, state={scan.state}"
        raise ValueError(
            f"rollout prefix is not append-ready: not at member level of an open object ({where}); last_char={last!r}"
        )
    if not fn_objects:
        if last == ",":
            raise ValueError("rollout prefix is not append-ready: it ends with ',' but there are no FN objects")
        return "}"
    leading = ", " if scan.members and last != "," else ""
    return leading + render_entries(list(fn_objects), start_index, field_order) + "}"


# ---------------------------------------------------------------------------------------------------
# Channel-B


# Over 60 lines: the Channel-B target recipe read top to bottom (append, join, weights, slots, checks).
def build_channel_b_segment(
    prompt_ids: Sequence[int],
    parse: ParseResult,
    gt_objects: Sequence[Mapping],
    match: MatchResult,
    codec,
    *,
    field_order: str = "desc_first",
    ordering: str = "sorted",
    desc_ce_weight: float = 1.0,
    drop_invalid_struct_ce_multiplier: float = 1.0,
    sample_id: str = "",
    max_len: int | None = None,
) -> Segment | Drop:
    """Rollout prefix + FN entries + `}` + `<|im_end|>` as a Channel-B segment, or a `Drop`.

    `match` must come from matching `[o.bbox for o in parse.objects]` against `gt_objects` (same order).
    FN objects are appended in canonical `ordering`, numbered from `parse.max_object_index + 1`.

    Raises:
        ValueError: invalid GT objects, a negative `desc_ce_weight`, or a `match` that does not index
            `parse.objects` / `gt_objects`.
    """
    check_gt(gt_objects, sample_id)
    check_match(match, len(parse.objects), len(gt_objects), sample_id)
    if desc_ce_weight < 0:
        raise ValueError(f"desc_ce_weight must be >= 0, got {desc_ce_weight}")
    meta = channel_b_meta(parse, match, len(gt_objects), len(prompt_ids))
    fn_objs = list(canonical_order([gt_objects[j] for j in match.fn_indices], ordering))
    prefix_scan = parse.prefix_scan
    try:
        fragment = _fragment(parse.prefix_text, prefix_scan, fn_objs, max(parse.max_object_index, 0) + 1, field_order)
    except ValueError as e:
        return Drop("prefix_not_append_ready", sample_id, str(e), meta)
    joined = _join_at_boundary(parse, fragment, codec)
    if joined is None:
        return Drop("fragment_encoding", sample_id, f"fragment {fragment[:200]!r} does not round-trip cleanly", meta)
    n_pre, tail_ids, tail_pieces = joined  # rollout tokens kept verbatim; everything after is the (re-encoded) tail
    ids = parse.prefix_token_ids[:n_pre] + tail_ids + [codec.im_end_id]
    tail_pieces += codec.pieces([codec.im_end_id])
    meta.update({"rollout/prefix_len": n_pre, "rollout/append_len": len(ids) - n_pre, "rollout/train_len": len(ids)})
    if max_len is not None and len(prompt_ids) + len(ids) > max_len:
        return Drop("too_long", sample_id, f"{len(prompt_ids) + len(ids)} tokens > max_len={max_len}", meta)
    at = parse.token_ends[n_pre - 1] if n_pre else 0  # the kept tokens' text: the prefix up to their end
    text = parse.prefix_text[:at] + "".join(tail_pieces)
    close, fn_desc = _closure_and_descs(
        text,
        len(parse.prefix_text),
        len(parse.prefix_text) + len(fragment) - 1,
        prefix_scan if text.startswith(parse.prefix_text) else None,
    )
    if close is None or len(fn_desc) != len(fn_objs):
        return Drop("closure_not_found", sample_id, "no outermost '}' right after the appended entries", meta)
    tail_starts, tail_ends = token_bounds(tail_pieces, at)
    starts, ends = span_lists(parse.token_starts[:n_pre] + tail_starts, parse.token_ends[:n_pre] + tail_ends)
    matched = [(parse.objects[i], gt_objects[j]) for i, j, _ in match.pairs]
    kept_coords = parse.prefix_coord_positions[: bisect.bisect_left(parse.prefix_coord_positions, n_pre)]
    coord_at = kept_coords + coord_positions(ids, codec, n_pre)  # every coord token; the kept ones from the parse
    mult = min(max(float(drop_invalid_struct_ce_multiplier), 1.0), 4.0) if parse.n_dropped > 0 else 1.0
    tail_rule = (close, fn_desc, desc_ce_weight, mult)
    weights = _channel_b_weights(
        len(parse.prefix_text), n_pre, starts, ends, [o for o, _ in matched], tail_rule, coord_at
    )
    p0 = len(prompt_ids)
    coord_pos = [p0 + p for o, _ in matched for p in o.coord_positions]
    coord_bins = [int(b) for _, g in matched for b in g["bbox_2d"]]
    fn_at = coord_at[len(kept_coords) :]
    fn_pos, fn_bins = [p0 + y for y in fn_at], [codec.coord_bin_of[ids[y]] for y in fn_at]
    if fn_bins != [int(b) for g in fn_objs for b in g["bbox_2d"]]:
        return Drop("fn_coord_mismatch", sample_id, f"{len(fn_pos)} tail coord slots for {len(fn_objs)} FN boxes", meta)
    meta.update(
        {
            "rollout/prefix_coord_slots": len(coord_pos),
            "rollout/fn_coord_slots": len(fn_pos),
            "stage2/struct_ce_multiplied": int(mult != 1.0),
        }
    )
    return Segment(
        input_ids=list(prompt_ids) + ids,
        prompt_len=p0,
        ce_weights=[0.0] * p0 + weights,
        coord_pos=coord_pos + fn_pos,
        coord_bins=coord_bins + fn_bins,
        box_groups=["prefix"] * len(matched) + ["fn"] * len(fn_objs),
        channel="B",
        sample_id=sample_id,
        meta=meta,
    )


def _join_at_boundary(parse: ParseResult, fragment: str, codec) -> tuple[int, list[int], list[str]] | None:
    """How many rollout tokens are kept verbatim, then the ids and pieces of everything after (re-encoded), for
    prefix + fragment.

    The prefix is cut right after an object's `}`, which usually falls inside a fused BPE token (`"]}}`,
    `"]}, "`). Appending the fragment's own encoding after the re-tokenized cut would teach token splits
    the model never emits (`"]}` + `}` instead of `"]}}`: CE ~25 nats per boundary on the Stage-1 model).
    So the last prefix token is re-encoded together with the fragment, giving the tokens the model would
    produce when writing that text. Returns (kept count, tail ids, tail pieces), or None when the tail does not
    round-trip through the tokenizer.
    """
    keep = max(len(parse.prefix_token_ids) - 1, 0)
    start = parse.token_starts[keep] if keep < len(parse.token_starts) else len(parse.prefix_text)
    tail = parse.prefix_text[start:] + fragment
    tail_ids = codec.encode(tail)
    tail_pieces = codec.pieces(tail_ids)
    if "".join(tail_pieces) != tail or codec.im_end_id in tail_ids:
        return None
    return keep, tail_ids, tail_pieces


def channel_b_meta(parse: ParseResult, match: MatchResult, n_gt: int, prompt_len: int) -> dict:
    """Per-sample parse/match counters (summed into step metrics; rates are computed from the sums)."""
    meta = {
        "rollout/samples": 1,
        "rollout/pred_objects": parse.n_total_objects,
        "rollout/valid_pred_objects": len(parse.objects),
        "rollout/parse_dropped_invalid": parse.n_dropped,
        "rollout/parse_truncated": int(parse.truncated),
        "rollout/parse_malformed": int(parse.malformed),
        "rollout/invalid_rollout": int(parse.fallback and (parse.truncated or parse.malformed)),
        "rollout/gt_objects": n_gt,
        "rollout/matched": len(match.pairs),
        "rollout/fp": len(match.fp_indices),
        "rollout/fn": len(match.fn_indices),
        "rollout/fn_appended": len(match.fn_indices),
        "rollout/gating_rejections": match.gating_rejections,
        "rollout/matched_maskiou_sum": match.iou_sum,
        "rollout/rollout_len": parse.rollout_len,
        "rollout/prompt_len": prompt_len,
    }
    meta.update({f"rollout/parse_drop/{r}": parse.drops.get(r, 0) for r in DROP_REASONS})
    return meta


# ---------------------------------------------------------------------------------------------------
# Channel-A


def build_channel_a_segment(
    prompt_ids: Sequence[int],
    gt_objects: Sequence[Mapping],
    codec,
    *,
    field_order: str = "desc_first",
    ordering: str = "sorted",
    desc_ce_weight: float = 1.0,
    sample_id: str = "",
    max_len: int | None = None,
) -> Segment | Drop:
    """The canonical answer + `<|im_end|>`, teacher-forced: every non-coord token CE, every GT coord slot.

    Raises:
        ValueError: invalid GT objects or a negative `desc_ce_weight`.
    """
    check_gt(gt_objects, sample_id)
    if desc_ce_weight < 0:
        raise ValueError(f"desc_ce_weight must be >= 0, got {desc_ce_weight}")
    ordered = canonical_order(gt_objects, ordering)
    answer = render_answer(ordered, field_order, "given")
    ans_ids = codec.encode(answer)
    ids = ans_ids + [codec.im_end_id]
    meta = {"stage2/a_gt_objects": len(ordered), "stage2/a_train_len": len(ids)}
    ans_pieces = codec.pieces(ans_ids)
    if "".join(ans_pieces) != answer or codec.im_end_id in ans_ids:
        return Drop("answer_encoding", sample_id, f"answer {answer[:200]!r} does not round-trip cleanly", meta)
    if max_len is not None and len(prompt_ids) + len(ids) > max_len:
        return Drop("too_long", sample_id, f"{len(prompt_ids) + len(ids)} tokens > max_len={max_len}", meta)
    pieces = ans_pieces + codec.pieces([codec.im_end_id])
    close, descs = _closure_and_descs("".join(pieces), 0, len(answer) - 1)
    if close is None or len(descs) != len(ordered):
        return Drop("closure_not_found", sample_id, "canonical answer did not scan as one object", meta)
    at = coord_positions(ids, codec)
    weights = _answer_weights(len(ids), *span_lists(*token_bounds(pieces)), 0, close, descs, desc_ce_weight, 1.0, at)
    p0 = len(prompt_ids)
    pos, bins = [p0 + y for y in at], [codec.coord_bin(ids[y]) for y in at]
    if bins != [int(b) for o in ordered for b in o["bbox_2d"]]:
        return Drop("coord_slot_mismatch", sample_id, f"{len(pos)} coord slots for {len(ordered)} GT boxes", meta)
    return Segment(
        list(prompt_ids) + ids, p0, [0.0] * p0 + weights, pos, bins, ["fn"] * len(ordered), "A", sample_id, meta
    )


# ---------------------------------------------------------------------------------------------------
# helpers


def _closure_and_descs(
    text: str, entries_from: int, close_at: int, prefix_scan: ObjectScan | None = None
) -> tuple[int | None, list[Span]]:
    """(index of the outermost `}` if it sits at `close_at`, desc content spans of members from `entries_from`).
    `prefix_scan`: the (member-level open) scan of a text that `text` starts with, continued instead of
    rescanning that part."""
    if prefix_scan is None:
        brace = text.find("{")
        prefix_scan = ObjectScan(brace, end=brace + 1) if brace >= 0 else None  # continued: scan_object(text, brace)
    if prefix_scan is None:
        return None, []
    scan, run = continue_canonical(text, prefix_scan)  # the appended entries' values read as they are scanned
    if scan.status != "closed" or scan.end != close_at + 1:
        return None, []
    got = dict(enumerate(run, len(prefix_scan.members)))
    descs = [_desc_span(text, mem, got.get(k)) for k, mem in enumerate(scan.members) if mem.key_start >= entries_from]
    return (None, []) if None in descs else (close_at, descs)


def _desc_span(text: str, mem, got=None) -> Span | None:
    """The content span of an object member's `"desc"` string, None when it has none. `got`: canonical_value's
    result for it, when read already."""
    if mem.kind != "object":
        return None
    if got is None:
        got = canonical_value(text, mem)
    if isinstance(got, tuple):  # the renderer's spelling (every FN entry) read with one regex, not scanned
        return got[3]
    d = (fields_of(text, mem) or {}).get('"desc"')
    return (d.value_start + 1, d.value_end - 1) if d is not None and d.kind == "string" else None


def _channel_b_weights(prefix_chars, n_pre, starts, ends, matched_objs, tail_rule, coord_at) -> list[float]:
    """CE weights of a Channel-B answer. Tokens that end inside the rollout prefix (its first `prefix_chars`
    characters) follow the prefix rules (matched structure only, FP-neutral), even when re-encoded; a token
    reaching into the appended text is tail (FN entries, closure): `tail_rule` is (closure index, FN desc spans,
    desc weight, struct weight)."""
    n_split = bisect.bisect_right(ends, prefix_chars, n_pre)  # ends never decrease
    i_split = bisect.bisect_left(coord_at, n_split)
    weights = _prefix_weights(n_split, starts[:n_split], ends[:n_split], matched_objs, coord_at[:i_split])
    return weights + _answer_weights(len(starts), starts, ends, n_split, *tail_rule, coord_at[i_split:])


def _prefix_weights(n, starts, ends, matched_objs, coord_at) -> list[float]:
    """Weights of tokens 0..n-1: 1 for a non-coord token overlapping a matched object's span and none of their
    desc contents, else 0: painted span by span (tokens of a span are one range), not token by token.
    `coord_at`: the positions of the coord tokens among them."""
    out = [0.0] * n
    paint(out, token_ranges(starts, ends, [o.span for o in matched_objs]), 1.0)
    paint(out, token_ranges(starts, ends, [o.desc_span for o in matched_objs]), 0.0)
    for y in coord_at:
        out[y] = 0.0
    return out


def _answer_weights(n, starts, ends, lo, close, descs, desc_w, struct_w, coord_at) -> list[float]:
    """Weights of answer tokens lo..n-1 (the last one is `<|im_end|>`), by the tail priority rule, painted from
    the lowest priority up: structure, desc contents, the closure tokens, coord slots (`coord_at`: the positions
    of the coord tokens among them)."""
    out = [struct_w] * (n - lo)
    paint(out, token_ranges(starts, ends, descs, lo), float(desc_w), lo)
    paint(out, token_ranges(starts, ends, [(close, close + 1)], lo) + [(max(n - 1, lo), n)], 1.0, lo)
    for y in coord_at:
        out[y - lo] = 0.0
    return out
