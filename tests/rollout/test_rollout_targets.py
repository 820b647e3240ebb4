"""FN-append and Channel-A/B segments: which token gets which CE weight and which coord slots (§4.4, §4.5)."""

import random

import numpy as np
import pytest

from toolkit.data.render import dumps_payload, object_payload, render_answer
from toolkit.data.segment import Segment
from toolkit.rollout.match import MatchResult, match_boxes
from toolkit.rollout.parse import parse_rollout
from toolkit.rollout.targets import (
    Drop,
    build_channel_a_segment,
    build_channel_b_segment,
    fn_append_fragment,
)

PROMPT = [1, 1, 1, 1]  # <|im_start|> ids; any ids work as the prompt
KNOBS = dict(candidate_top_k=5, gate=0.5, resolution=256, fp_cost=1.0, fn_cost=1.0)
CAT = {"desc": "cat", "bbox_2d": [10, 10, 100, 100]}
DOG = {"desc": "dog", "bbox_2d": [500, 500, 700, 700]}
BUS = {"desc": "red bus", "bbox_2d": [200, 50, 400, 90]}


def entry(n, obj, field_order="desc_first"):
    return f'"object_{n}": ' + dumps_payload(object_payload(obj["desc"], obj["bbox_2d"], field_order))


def rollout(codec, text, im_end=True):
    return codec.encode(text) + ([codec.im_end_id] if im_end else [])


def build_b(codec, text, gt, **kw):
    parse = parse_rollout(rollout(codec, text), codec)
    match = match_boxes([o.bbox for o in parse.objects], [g["bbox_2d"] for g in gt], **KNOBS)
    seg = build_channel_b_segment(PROMPT, parse, gt, match, codec, **{"sample_id": "s", **kw})
    return parse, match, seg


def assistant(codec, seg):
    """(piece, weight) of the assistant tokens."""
    return list(zip(codec.pieces(seg.input_ids[seg.prompt_len :]), seg.ce_weights[seg.prompt_len :]))


def check_segment(codec, seg):
    assert isinstance(seg, Segment)
    assert seg.input_ids[-1] == codec.im_end_id and seg.ce_weights[-1] == 1.0
    assert all(w == 0 for w in seg.ce_weights[: seg.prompt_len])
    assert all(w == 0 for t, w in zip(seg.input_ids, seg.ce_weights) if codec.coord_bin(t) is not None)
    assert [codec.coord_bin(seg.input_ids[p]) is not None for p in seg.coord_pos] == [True] * len(seg.coord_pos)
    assert all(0 <= b <= 999 for b in seg.coord_bins)


# --------------------------------------------------------------------------------------------- fragment


def test_fragment_without_fn_closes_the_object():
    assert fn_append_fragment("{", [], 1) == "}"
    assert fn_append_fragment('{"object_1": {"desc": "a"}', [], 2) == "}"


def test_fragment_comma_policy():
    frag = entry(1, CAT) + "}"
    assert fn_append_fragment("{", [CAT], 1) == frag
    assert fn_append_fragment("{ \n", [CAT], 1) == frag
    assert fn_append_fragment('{"object_1": {"desc": "a"}', [CAT], 1) == ", " + frag
    assert fn_append_fragment('{"object_1": {"desc": "a"},', [CAT], 1) == frag
    with pytest.raises(ValueError, match="ends with ','"):
        fn_append_fragment('{"object_1": {"desc": "a"},', [], 2)


def test_fragment_numbering_and_field_order():
    frag = fn_append_fragment("{", [CAT, DOG], 5, "geometry_first")
    assert frag == entry(5, CAT, "geometry_first") + ", " + entry(6, DOG, "geometry_first") + "}"
    assert frag.index('"bbox_2d"') < frag.index('"desc"')


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "hello",
        '{"object_1": "x"',
        '{"object_1": {',
        '{"object_1": {"desc": "a}',
        '{"object_1": {}}',
        '{"object_1": 12',
        '{"object_1"',
        '{"object_1":',
        '{"a": 1 2',
    ],
)
def test_fragment_rejects_prefixes_that_are_not_append_ready(prefix):
    with pytest.raises(ValueError, match="not append-ready"):
        fn_append_fragment(prefix, [CAT], 1)


# --------------------------------------------------------------------------------------------- Channel-B


def test_matched_prefix_supervises_structure_only_not_desc_or_fp(codec):
    fp = {"desc": "cow", "bbox_2d": [900, 900, 950, 950]}
    text = "{" + ", ".join([entry(1, fp), entry(2, CAT), entry(3, fp)]) + "}"
    parse, match, seg = build_b(codec, text, [CAT])
    check_segment(codec, seg)
    assert [(i, j) for i, j, _ in match.pairs] == [(1, 0)] and match.fp_indices == [0, 2]
    cat = parse.objects[1]
    n_pre = len(parse.prefix_token_ids) - 1  # the last rollout token is re-encoded with the closing `}`
    offsets = parse.token_offsets[:n_pre]
    for y, ((s, e), w) in enumerate(zip(offsets, seg.ce_weights[seg.prompt_len :][:n_pre])):
        t = parse.prefix_token_ids[y]
        in_cat = s < cat.span[1] and e > cat.span[0]
        in_desc = s < cat.desc_span[1] and e > cat.desc_span[0]
        assert w == (1.0 if in_cat and not in_desc and codec.coord_bin(t) is None else 0.0), (y, parse.prefix_text[s:e])
    supervised = "".join(parse.prefix_text[s:e] for (s, e), w in zip(offsets, seg.ce_weights[seg.prompt_len :]) if w)
    assert "cow" not in supervised and "cat" not in supervised and "object_2" in supervised
    assert '"object_1"' not in supervised and '"object_3"' not in supervised
    # the FP object's closing `"]}` fuses with the outermost `}` into one token: closure, so supervised
    assert codec.pieces(seg.input_ids[-2:]) == ['"]}}', "<|im_end|>"] and seg.ce_weights[-2] == 1.0
    # geometry: the matched object's 4 coord slots, prefix group, GT bins
    assert seg.box_groups == ["prefix"] and seg.coord_bins == CAT["bbox_2d"]
    assert seg.coord_pos == [seg.prompt_len + p for p in cat.coord_positions]


def test_matched_slots_take_gt_bins_not_predicted_bins(codec):
    pred = {"desc": "cat", "bbox_2d": [12, 11, 98, 99]}
    _, match, seg = build_b(codec, "{" + entry(1, pred) + "}", [CAT])
    assert len(match.pairs) == 1
    assert [codec.coord_bin(seg.input_ids[p]) for p in seg.coord_pos] == pred["bbox_2d"]
    assert seg.coord_bins == CAT["bbox_2d"]


def test_fn_numbering_continues_after_invalid_and_non_dict_keys(codec):
    text = "{" + ", ".join([entry(1, CAT), '"object_3": {"desc": ""}', '"object_4": 5', entry(2, CAT)]) + "}"
    parse, _, seg = build_b(codec, text, [CAT, DOG])
    answer = "".join(codec.pieces(seg.input_ids[seg.prompt_len :]))
    assert answer == parse.prefix_text + ", " + entry(5, DOG) + "}<|im_end|>"
    check_segment(codec, seg)


def test_fn_only_sample_has_coord_slots_and_full_tail_supervision(codec):
    _, match, seg = build_b(codec, "hello", [DOG, CAT], desc_ce_weight=0.25)
    check_segment(codec, seg)
    assert match.fn_indices == [0, 1]
    # canonical order (sorted by y1, x1) among the FN objects; group fn; bins from the appended tokens
    assert seg.box_groups == ["fn", "fn"] and seg.coord_bins == CAT["bbox_2d"] + DOG["bbox_2d"]
    toks = assistant(codec, seg)
    # the synthesized `{` is re-encoded with the first FN key into the token the model should emit first
    assert toks[0] == ('{"object_', 1.0)
    assert dict(toks)["cat"] == 0.25 and dict(toks)["dog"] == 0.25
    assert all(w == 1.0 for p, w in toks[1:] if codec.coord_bin(codec.encode(p)[0]) is None and p not in ("cat", "dog"))
    assert seg.meta["rollout/invalid_rollout"] == 1 and seg.meta["rollout/fn_coord_slots"] == 8


def test_closure_is_supervised_and_multiplier_applies_to_fn_structure_only(codec):
    text = "{" + entry(1, CAT) + ', "object_2": {"desc": "x"}}'  # one drop (missing_geom)
    parse, _, seg = build_b(codec, text, [CAT, DOG], desc_ce_weight=0.0, drop_invalid_struct_ce_multiplier=3.0)
    check_segment(codec, seg)
    assert parse.n_dropped == 1
    tail = assistant(codec, seg)[len(parse.prefix_token_ids) :]
    assert tail[-2:] == [('"]}}', 1.0), ("<|im_end|>", 1.0)]  # closure: exactly 1, fused with the FN end
    assert dict(tail)["dog"] == 0.0
    struct = [w for p, w in tail[:-2] if p != "dog" and codec.coord_bin(codec.encode(p)[0]) is None]
    assert struct and set(struct) == {3.0}
    assert seg.meta["stage2/struct_ce_multiplied"] == 1


@pytest.mark.parametrize("mult, expected", [(10.0, 4.0), (0.5, 1.0), (2.0, 2.0)])
def test_multiplier_is_clamped(codec, mult, expected):
    text = '{"object_1": 5}'
    _, _, seg = build_b(codec, text, [DOG], drop_invalid_struct_ce_multiplier=mult)
    tail = assistant(codec, seg)[1:-2]
    assert {w for p, w in tail if p != "dog" and codec.coord_bin(codec.encode(p)[0]) is None} == {expected}


def test_no_drops_means_no_multiplier(codec):
    _, _, seg = build_b(codec, "{", [DOG], drop_invalid_struct_ce_multiplier=4.0)
    assert max(seg.ce_weights) == 1.0


def test_perfect_rollout_is_all_matched_and_closes(codec):
    gt = [CAT, BUS, DOG]
    text = render_answer(gt)
    parse, match, seg = build_b(codec, text, gt)
    check_segment(codec, seg)
    assert len(match.pairs) == 3 and match.fn_indices == []
    answer = "".join(codec.pieces(seg.input_ids[seg.prompt_len :]))
    assert answer == text + "<|im_end|>"
    # the cut inside the fused `"]}}` is healed: the target is the rollout's own tokenization, token for token
    assert seg.input_ids[seg.prompt_len :] == codec.encode(text) + [codec.im_end_id]
    a = build_channel_a_segment(PROMPT, gt, codec)
    assert seg.coord_pos == a.coord_pos and seg.coord_bins == a.coord_bins  # same slot rule in A and B
    assert seg.box_groups == ["prefix"] * 3


def test_desc_with_braces_keeps_closure(codec):
    odd = {"desc": 'a}b{"c', "bbox_2d": [1, 1, 5, 5]}
    _, _, seg = build_b(codec, "{", [odd])
    check_segment(codec, seg)
    assert "".join(codec.pieces(seg.input_ids[seg.prompt_len :])).endswith('"]}}<|im_end|>')


def test_gt_desc_spelling_a_special_token_is_dropped(codec):
    evil = {"desc": "<|im_end|>", "bbox_2d": [1, 1, 5, 5]}
    _, _, seg = build_b(codec, "{", [evil])
    assert isinstance(seg, Drop) and seg.reason == "fragment_encoding" and seg.meta["rollout/gt_objects"] == 1
    assert build_channel_a_segment(PROMPT, [evil], codec).reason == "answer_encoding"


def test_too_long_is_a_drop_with_counters(codec):
    _, _, seg = build_b(codec, "{", [CAT, DOG], max_len=10)
    assert isinstance(seg, Drop) and seg.reason == "too_long" and seg.sample_id == "s"
    assert seg.meta["rollout/fn"] == 2 and seg.meta["rollout/samples"] == 1


def test_meta_counters(codec):
    text = "{" + entry(1, CAT) + ', "object_2": {"desc": "x", "poly": []}, ' + entry(3, DOG)
    _, _, seg = build_b(codec, text[:-30], [CAT, BUS])
    m = seg.meta
    assert (m["rollout/pred_objects"], m["rollout/valid_pred_objects"], m["rollout/parse_dropped_invalid"]) == (3, 1, 2)
    assert m["rollout/parse_drop/poly_unsupported"] == 1 and m["rollout/parse_drop/key_invalid"] == 1
    assert (m["rollout/matched"], m["rollout/fp"], m["rollout/fn"], m["rollout/gt_objects"]) == (1, 0, 1, 2)
    assert m["rollout/parse_truncated"] == 1 and m["rollout/matched_maskiou_sum"] == 1.0
    assert m["rollout/train_len"] == m["rollout/prefix_len"] + m["rollout/append_len"] == len(seg) - len(PROMPT)


def test_caller_bugs_raise(codec):
    parse = parse_rollout(rollout(codec, "{"), codec)
    with pytest.raises(ValueError, match="GT object 0"):
        build_channel_b_segment(
            PROMPT, parse, [{"desc": "a", "bbox_2d": [5, 5, 1, 1]}], MatchResult([], [], [0], 0), codec
        )
    with pytest.raises(ValueError, match="partition"):
        build_channel_b_segment(PROMPT, parse, [CAT], MatchResult([], [], [], 0), codec)


# --------------------------------------------------------------------------------------------- Channel-A


@pytest.mark.parametrize("field_order", ["desc_first", "geometry_first"])
def test_channel_a_supervises_every_answer_token(codec, field_order):
    gt = [DOG, CAT, BUS]
    seg = build_channel_a_segment(PROMPT, gt, codec, field_order=field_order, desc_ce_weight=0.5, sample_id="a")
    check_segment(codec, seg)
    text = "".join(codec.pieces(seg.input_ids[seg.prompt_len :]))
    assert text == render_answer(gt, field_order) + "<|im_end|>"
    assert len(seg.coord_pos) == 12 and seg.box_groups == ["fn"] * 3
    assert seg.coord_bins == CAT["bbox_2d"] + BUS["bbox_2d"] + DOG["bbox_2d"]  # sorted by (y1, x1)
    for piece, w in assistant(codec, seg):
        if codec.coord_bin(codec.encode(piece)[0]) is not None:
            assert w == 0.0
        elif piece in ("cat", "dog", "red ", "b", "u", "s"):
            assert w == 0.5
        else:
            assert w == 1.0


def test_channel_a_given_order_and_empty_answer(codec):
    seg = build_channel_a_segment(PROMPT, [DOG, CAT], codec, ordering="given")
    assert seg.coord_bins == DOG["bbox_2d"] + CAT["bbox_2d"]
    empty = build_channel_a_segment(PROMPT, [], codec)
    assert codec.pieces(empty.input_ids[empty.prompt_len :]) == ["{", "}", "<|im_end|>"]
    assert empty.ce_weights[empty.prompt_len :] == [1.0, 1.0, 1.0] and empty.coord_pos == []


def test_channel_a_too_long(codec):
    seg = build_channel_a_segment(PROMPT, [CAT], codec, max_len=8, sample_id="x")
    assert isinstance(seg, Drop) and seg.reason == "too_long" and seg.sample_id == "x"


def test_empty_object_is_a_valid_rollout_not_invalid(codec):
    """Differs from the predecessor (docs/METRICS_LOSSES.md): `{}` is the right answer for an image with
    nothing to find, so it is not counted in rollout/invalid_rollout; `{` alone or no JSON still is."""
    for text, invalid in (("{}", 0), ("{", 1), ("no json", 1)):
        _, _, seg = build_b(codec, text, [])
        check_segment(codec, seg)
        assert seg.meta["rollout/invalid_rollout"] == invalid, text
    _, _, seg = build_b(codec, "{}", [])
    assert "".join(codec.pieces(seg.input_ids[seg.prompt_len :])) == "{}<|im_end|>"


def _overlaps_ref(spans, s, e):
    return any(a < e and b > s or (a == b and s < a < e) for a, b in spans)


def test_painted_weights_equal_the_per_token_rule(codec):
    """`_prefix_weights` / `_answer_weights` paint span by span; the same weights as the per-token rule of the
    module docstring on random token frames (empty pieces included) and random object, desc and closure spans."""
    from types import SimpleNamespace

    from toolkit.rollout.targets import _answer_weights, _prefix_weights
    from toolkit.rollout.token_spans import coord_positions, span_lists, token_bounds

    rng = random.Random(5)
    coord_ids = set(codec.coord_token_ids)
    for trial in range(300):
        pieces = [rng.choice(["", "a", "bc", '"]}, "', "x" * rng.randint(1, 9)]) for _ in range(rng.randint(1, 60))]
        starts, ends = span_lists(*token_bounds(pieces))  # checked against the rule in the next test
        offsets = list(zip(starts, ends))
        n_chars = max(e for _, e in offsets) + 2
        ids = [rng.choice(codec.coord_token_ids) if rng.random() < 0.2 else 5000 + k for k in range(len(pieces))]
        cuts = sorted(rng.sample(range(n_chars), min(n_chars, 2 * rng.randint(0, 6))))
        spans = list(zip(cuts[::2], cuts[1::2]))  # disjoint, sorted
        descs = [(a + rng.randint(0, b - a), b - rng.randint(0, (b - a) // 2)) for a, b in spans]
        descs = [(a, max(a, b)) for a, b in descs]
        objs = [SimpleNamespace(span=sp, desc_span=d) for sp, d in zip(spans, descs)]
        want = [
            float(t not in coord_ids and _overlaps_ref(spans, s, e) and not _overlaps_ref(descs, s, e))
            for t, (s, e) in zip(ids, offsets)
        ]
        assert _prefix_weights(len(ids), starts, ends, objs, coord_positions(ids, codec)) == want, trial
        lo, close = rng.randint(0, len(ids)), rng.randint(0, n_chars)
        want = []
        for y in range(lo, len(ids)):
            s, e = offsets[y]
            want.append(
                0.0
                if ids[y] in coord_ids
                else 1.0
                if y == len(ids) - 1 or s <= close < e
                else 0.7
                if _overlaps_ref(descs, s, e)
                else 1.5
            )
        got = _answer_weights(len(ids), starts, ends, lo, close, descs, 0.7, 1.5, coord_positions(ids, codec, lo))
        assert got == want, trial


def test_token_spans_equal_the_per_token_rule():
    """`span_lists` of `token_bounds` applies the empty-piece rule only when a piece is empty; the spans equal the
    per-token rule of the module docstring (an empty piece spans the next character) on random frames, also from a
    starting offset."""
    from toolkit.rollout.token_spans import span_lists, token_bounds

    rng = random.Random(7)
    for trial in range(500):
        pieces = [rng.choice(["", "a", "bc", '"]}, "', "x" * rng.randint(1, 9)]) for _ in range(rng.randint(0, 40))]
        if trial % 2:
            pieces = [p for p in pieces if p]
        at = trial % 5
        want, pos = [], at
        for p in pieces:
            want.append((pos, pos + len(p) if p else pos + 1))
            pos += len(p)
        assert list(zip(*span_lists(*token_bounds(pieces, at)))) == want, pieces


@pytest.mark.parametrize(
    "bin_value, ok",
    [
        (0, True),
        (999, True),
        (1000, False),
        (-1, False),
        (True, False),
        (5.0, False),
        ("5", False),
        (np.int64(7), True),
        (np.int64(1000), False),
    ],
)
def test_gt_bins_are_integers_in_range_of_any_integer_type(codec, bin_value, ok):
    """Plain ints take a fast path in the GT check; numpy integers the general one; bools are never bins."""
    gt = [{"desc": "a", "bbox_2d": [bin_value, 0, 999, 999]}]
    parse = parse_rollout(rollout(codec, "{"), codec)
    build = lambda: build_channel_a_segment(PROMPT, gt, codec)  # noqa: E731
    if ok:
        assert isinstance(build(), Segment)
        assert isinstance(build_channel_b_segment(PROMPT, parse, gt, MatchResult([], [], [0], 0), codec), Segment)
    else:
        with pytest.raises(ValueError, match="GT object 0"):
            build()


def test_render_entries_in_one_dumps_equal_the_entries_dumped_one_by_one():
    """`render_entries` dumps all FN entries in one `json.dumps`; the same text as dumping each and joining with
    ", " (escapes, non-ASCII, both field orders, no entry)."""
    from toolkit.data.render import dumps_payload, object_payload, render_entries

    rng = random.Random(11)
    descs = ["cat", 'a "q"', "é ü", "x\\y", "tab\t", "}{", "<|coord_3|>", ""]
    for trial in range(300):
        objs = [
            {"desc": rng.choice(descs), "bbox_2d": [rng.randrange(1000) for _ in range(4)]}
            for _ in range(rng.randrange(6))
        ]
        start, order = rng.randrange(1, 90), rng.choice(["desc_first", "geometry_first"])
        want = ", ".join(
            f'"object_{start + i}": ' + dumps_payload(object_payload(o["desc"], o["bbox_2d"], order))
            for i, o in enumerate(objs)
        )
        assert render_entries(objs, start, order) == want, trial


def test_gt_check_fast_path_agrees_with_the_per_object_rule():
    """`_plain_gt_ok` checks all GT objects in a few C-level passes; whenever it accepts, the per-object rule accepts,
    and `check_gt` raises exactly when the per-object rule does (random GT lists with one odd value: bools, floats,
    numpy ints, tuples, out-of-range or swapped bins, missing or non-str descs, short boxes, non-dict objects)."""
    from collections import UserDict
    from unittest import mock

    from toolkit.rollout import input_checks

    def per_object_raises(gt):
        with mock.patch.object(input_checks, "_plain_gt_ok", lambda _: False):
            try:
                input_checks.check_gt(gt, "s")
            except ValueError:
                return True
        return False

    odd = [True, 1.0, np.int64(5), -1, 1000, None, "3"]
    rng = random.Random(5)
    accepted = 0
    for _trial in range(2_000):
        gt = []
        for _ in range(rng.randrange(4)):
            x1, y1 = rng.randrange(1000), rng.randrange(1000)
            box = [x1, y1, rng.randrange(x1, 1000), rng.randrange(y1, 1000)]
            gt.append({"desc": rng.choice(["cat", ""]), "bbox_2d": box if rng.random() < 0.8 else tuple(box)})
        if gt and rng.random() < 0.6:
            o = gt[rng.randrange(len(gt))]
            change = rng.randrange(6)
            if change == 0:
                o["bbox_2d"] = list(o["bbox_2d"])
                o["bbox_2d"][rng.randrange(4)] = rng.choice(odd)
            elif change == 1:
                o["bbox_2d"] = list(o["bbox_2d"])[::-1]  # swapped bins, mostly
            elif change == 2:
                o["desc"] = rng.choice([None, 3, b"cat"])
            elif change == 3:
                del o[rng.choice(["desc", "bbox_2d"])]
            elif change == 4:
                o["bbox_2d"] = list(o["bbox_2d"])[: rng.randrange(4)]
            else:
                gt[gt.index(o)] = UserDict(o)
        fast = input_checks._plain_gt_ok(gt)
        accepted += fast
        assert not (fast and per_object_raises(gt)), gt
        try:
            input_checks.check_gt(gt, "s")
            raised = False
        except ValueError:
            raised = True
        assert raised == per_object_raises(gt), gt
    assert accepted > 500  # the fast path is taken on plain input
