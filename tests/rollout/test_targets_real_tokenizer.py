"""Parser and FN-append targets token by token with the project's real tokenizer (assets/tokenizer, the one
the trainer loads), including the fused-BPE boundary the trainer re-encodes: the rollout's last kept token
(`"]}}`, the object's `}` fused with the outermost one) becomes `"]}, "` once FN entries are appended.

Each expected list is the exact (piece, CE weight) sequence of the assistant tokens; coordinate tokens
are geometry slots (CE 0). These pin the rows of "Where we differ from the predecessor" in
docs/METRICS_LOSSES.md that concern targets (closure never multiplied, the FP boundary token is tail).
"""

from pathlib import Path

import pytest

from toolkit.data.render import dumps_payload, object_payload
from toolkit.rollout.match import match_boxes
from toolkit.rollout.parse import parse_rollout
from toolkit.rollout.targets import build_channel_a_segment, build_channel_b_segment

TOKENIZER = Path(__file__).resolve().parents[2] / "assets" / "tokenizer"
PROMPT = [1, 2, 3]
CAT = {"desc": "cat", "bbox_2d": [10, 10, 100, 100]}
DOG = {"desc": "dog", "bbox_2d": [500, 500, 700, 700]}
COW = {"desc": "cow", "bbox_2d": [900, 900, 950, 950]}
KNOBS = dict(candidate_top_k=5, gate=0.5, resolution=256, fp_cost=1.0, fn_cost=1.0)


@pytest.fixture(scope="module")
def codec():
    from toolkit.data.tokenizer import load_tokenizer
    from toolkit.rollout.codec import HFTokenCodec

    return HFTokenCodec(load_tokenizer(str(TOKENIZER)))


def entry(n, obj):
    return f'"object_{n}": ' + dumps_payload(object_payload(obj["desc"], obj["bbox_2d"]))


def coords(bins, w_sep):
    """The pieces of `["<|coord_a|>", …]` after `": ["`: coord tokens (weight 0) between `", "` separators."""
    out = []
    for k, b in enumerate(bins):
        if k:
            out.append(('", "', w_sep))
        out.append((f"<|coord_{b}|>", 0.0))
    return out


def obj(n, o, w_struct, w_desc, end, w_end):
    """The pieces of one entry from `object_n` to its closing token (`end`), with their weights."""
    return (
        [(f"object_{n}", w_struct), ('": {"', w_struct), ("desc", w_struct), ('": "', w_struct)]
        + [(p, w_desc) for p in o["pieces"]]
        + [('", "', w_struct), ("bbox_2d", w_struct), ('": ["', w_struct)]
        + coords(o["bbox_2d"], w_struct)
        + [(end, w_end)]
    )


def build_b(codec, text, gt, **kw):
    ids = codec.encode(text) + [codec.im_end_id]
    parse = parse_rollout(ids, codec)
    match = match_boxes([o.bbox for o in parse.objects], [g["bbox_2d"] for g in gt], **KNOBS)
    seg = build_channel_b_segment(PROMPT, parse, gt, match, codec, sample_id="s", **kw)
    return ids, parse, seg


def assistant(codec, seg):
    return list(zip(codec.pieces(seg.input_ids[len(PROMPT) :]), seg.ce_weights[len(PROMPT) :]))


def test_parser_frames_the_real_tokens_and_cuts_inside_the_fused_closing_token(codec):
    ids, parse, _ = build_b(codec, "{" + entry(1, CAT) + "}", [CAT])
    assert codec.pieces(ids) == [
        '{"',
        "object_1",
        '": {"',
        "desc",
        '": "',
        "cat",
        '", "',
        "bbox_2d",
        '": ["',
        "<|coord_10|>",
        '", "',
        "<|coord_10|>",
        '", "',
        "<|coord_100|>",
        '", "',
        "<|coord_100|>",
        '"]}}',
        "<|im_end|>",
    ]
    # The prefix stops after the object's `}`: inside the fused `"]}}`, whose first three characters stay.
    assert parse.prefix_text == "{" + entry(1, CAT)
    assert codec.pieces(parse.prefix_token_ids)[-1] == '"]}'
    assert [o.coord_positions for o in parse.objects] == [(9, 11, 13, 15)]
    assert [o.bbox for o in parse.objects] == [(10, 10, 100, 100)]


def test_fn_append_after_a_matched_object_re_encodes_the_boundary(codec):
    _, _, seg = build_b(codec, "{" + entry(1, CAT) + "}", [CAT, DOG], desc_ce_weight=0.5)
    want = (
        [('{"', 1.0)]
        + obj(1, {**CAT, "pieces": ["cat"]}, 1.0, 0.0, '"]}, "', 1.0)
        + obj(2, {**DOG, "pieces": ["dog"]}, 1.0, 0.5, '"]}}', 1.0)
        + [("<|im_end|>", 1.0)]
    )
    assert assistant(codec, seg) == want
    p0 = len(PROMPT)
    assert seg.coord_pos == [p0 + p for p in (9, 11, 13, 15, 25, 27, 29, 31)]
    assert seg.coord_bins == CAT["bbox_2d"] + DOG["bbox_2d"] and seg.box_groups == ["prefix", "fn"]


def test_fp_last_object_keeps_its_body_unsupervised_but_its_fused_boundary_is_tail(codec):
    """Differs from the predecessor: the FP's closing token, re-encoded with the appended `, "` into
    `"]}, "`, is supervised tail (it writes the separator of the FN entry); the rest of the FP is 0."""
    _, parse, seg = build_b(codec, "{" + entry(1, CAT) + ", " + entry(2, COW) + "}", [CAT, DOG], desc_ce_weight=0.5)
    assert [o.desc for o in parse.objects] == ["cat", "cow"]
    want = (
        [('{"', 1.0)]
        + obj(1, {**CAT, "pieces": ["cat"]}, 1.0, 0.0, '"]}, "', 1.0)
        + obj(2, {**COW, "pieces": ["c", "o", "w"]}, 0.0, 0.0, '"]}, "', 1.0)
        + obj(3, {**DOG, "pieces": ["dog"]}, 1.0, 0.5, '"]}}', 1.0)
        + [("<|im_end|>", 1.0)]
    )
    assert assistant(codec, seg) == want


def test_multiplier_scales_fn_structure_but_never_the_closure(codec):
    """Differs from the predecessor: `"]}}` (holding the outermost `}`) and `<|im_end|>` stay at 1."""
    text = "{" + entry(1, CAT) + ', "object_2": {"desc": "x"}}'  # one dropped object (missing_geom)
    _, parse, seg = build_b(codec, text, [CAT, DOG], desc_ce_weight=0.5, drop_invalid_struct_ce_multiplier=2.0)
    assert parse.n_dropped == 1
    got = assistant(codec, seg)
    n_prefix = len(parse.prefix_token_ids) - 1
    tail = got[n_prefix:]
    # The invalid object's own `}` is re-encoded alone (prefix rules: unsupervised); the appended `, "`
    # and the FN structure are multiplied, its desc gets desc_ce_weight, the closure stays at 1.
    assert tail == (
        [("}", 0.0), (', "', 2.0)] + obj(3, {**DOG, "pieces": ["dog"]}, 2.0, 0.5, '"]}}', 1.0) + [("<|im_end|>", 1.0)]
    )


def test_channel_a_answer_token_by_token(codec):
    seg = build_channel_a_segment(PROMPT, [CAT, DOG], codec, desc_ce_weight=0.5, sample_id="a")
    want = (
        [('{"', 1.0)]
        + obj(1, {**CAT, "pieces": ["cat"]}, 1.0, 0.5, '"]}, "', 1.0)
        + obj(2, {**DOG, "pieces": ["dog"]}, 1.0, 0.5, '"]}}', 1.0)
        + [("<|im_end|>", 1.0)]
    )
    assert assistant(codec, seg) == want
    assert seg.coord_bins == CAT["bbox_2d"] + DOG["bbox_2d"] and seg.box_groups == ["fn", "fn"]
