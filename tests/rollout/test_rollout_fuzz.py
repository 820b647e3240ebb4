"""Property fuzzes: the parser never raises and always returns an append-ready, token-exact prefix; the
Channel-B builder always returns a Segment or a Drop whose invariants hold.

Inputs are decoded from Hypothesis-drawn bytes through tables of JSON-ish fragments, whole and cut
object entries, special/coord/punctuation ids and arbitrary ids: byte strings are the cheapest thing
Hypothesis draws (10,000 cases per fuzz in seconds) and still shrink to short inputs. Deterministic
(`derandomize=True`), no example database.
"""

import contextlib
import random
import re
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.data.coords import MAX_BIN
from toolkit.data.render import dumps_payload, object_payload, render_answer
from toolkit.data.segment import Segment
from toolkit.rollout import parse, scan
from toolkit.rollout.codec import ToyCodec
from toolkit.rollout.match import match_boxes
from toolkit.rollout.parse import DROP_REASONS, parse_rollout
from toolkit.rollout.scan import continue_scan, scan_object
from toolkit.rollout.targets import Drop, build_channel_b_segment, fn_append_fragment

CODEC = ToyCodec()
FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
CAT = {"desc": "cat", "bbox_2d": [10, 10, 100, 100]}
DESCS = ["cat", "dog", "red bus", 'a "q"', "}{", "é", "x\\y", " ", "<|coord_3|>"]
ORDERS = ["desc_first", "geometry_first"]


def _entry(n, desc, bbox, order="desc_first"):
    return f'"object_{n}": ' + dumps_payload(object_payload(desc, bbox, order))


ENTRIES = [
    _entry(
        1 + k % 12,
        DESCS[k % len(DESCS)],
        [(37 * k) % 1000, (91 * k) % 1000, (53 * k + 400) % 1000, (17 * k + 500) % 1000],
        ORDERS[k % 2],
    )
    for k in range(24)
]  # some with x2 < x1
FRAGMENTS = [
    "{",
    "{",
    "{",
    "}",
    "[",
    "]",
    '"',
    ":",
    ",",
    ", ",
    ", ",
    " ",
    "\\",
    "\n",
    '\\"',
    "x",
    "7",
    "null",
    "-1e5",
    "é",
    '"object_1": ',
    '"object_12": ',
    '"object_0": ',
    '"desc": ',
    '"bbox_2d": ',
    '"poly": ',
    '"cat"',
    '""',
    '"<|coord_5|>"',
    "<|coord_999|>",
    '", "',
    '"]}, "',
    '"]}}',
    "}}",
    '{"object_',
    '": {"desc": "',
    "<|im_end|>",
    '["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"]',
    "<|im_start|>",
    "😀",
    "\ud800",
]
_COORDS = '["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"]'
ENTRIES += [  # one per drop reason
    '"object_3": {"desc": "a" "bbox_2d": []}',
    f'"object_4": {{"bbox_2d": {_COORDS}}}',
    '"object_5": {"desc": "a"}',
    '"object_6": {"desc": "a", "bbox_3d": [1]}',
    f'"object_7": {{"desc": "a", "poly": {_COORDS}}}',
    '"object_8": {"desc": "a", "bbox_2d": ["<|coord_1|>"]}',
    '"object_9": {"desc": "a", "bbox_2d": ["<|coord_1|>", "12", "<|coord_3|>", "<|coord_4|>"]}',
]
TEXT_TABLE = FRAGMENTS + ENTRIES + [e[: len(e) // 2] for e in ENTRIES[:8]]
_IDS = (
    [0],
    [1],
    [2],
    *([i] for i in range(CODEC.multi_base, CODEC.char_base)),
    *([CODEC.coord_token_ids[k]] for k in (0, 1, 5, 12, 500, 999)),
    *([CODEC.char_base + ord(c)] for c in '{}[]":, \\abo_0123456789jectdsx'),
)
ID_TABLE = list(_IDS) + [CODEC.encode(t) for t in TEXT_TABLE]


class Draw:
    """Reads a byte string as a stream of choices (0 once exhausted)."""

    def __init__(self, data: bytes):
        self.data, self.i = data, 0

    def byte(self) -> int:
        self.i += 1
        return self.data[self.i - 1] if self.i <= len(self.data) else 0

    def pick(self, seq):
        return seq[self.byte() % len(seq)]

    def more(self) -> bool:
        return self.i < len(self.data)


def text_from(data: bytes) -> str:
    """Either a fragment soup, or (odd first byte) a document: `{` then mostly whole entries."""
    d = Draw(data)
    document = d.byte() % 2
    parts = [d.pick(["{", "{", " {", "x{"])] if document else []
    while d.more():
        b = d.byte()
        if document and b < 144:
            parts.append(ENTRIES[b % len(ENTRIES)] + (", " if b < 128 else "}"))
        else:
            parts.append(TEXT_TABLE[b % len(TEXT_TABLE)])
    return "".join(parts)


def ids_from(data: bytes) -> list[int]:
    """Table ids and arbitrary ids; (odd first byte) starting with `{` and biased to encoded entries."""
    d = Draw(data)
    document = d.byte() % 2
    ids = CODEC.encode("{") if document else []
    while d.more():
        b = d.byte()
        if b >= 240:  # any id of the vocabulary's first 64k characters
            ids.append((d.byte() << 8 | d.byte()) + CODEC.char_base * (b % 2))
        elif document and b < 112:
            ids.extend(CODEC.encode(ENTRIES[b % len(ENTRIES)] + ", "))
        else:
            ids.extend(ID_TABLE[b % len(ID_TABLE)])
    return ids


def check_parse(ids, res):
    text = "".join(CODEC.pieces(ids[: len(ids) if not res.stopped_at_im_end else ids.index(CODEC.im_end_id)]))
    assert "".join(CODEC.pieces(res.prefix_token_ids)) == res.prefix_text
    assert [res.prefix_text[s:e] for s, e in res.token_offsets] == CODEC.pieces(res.prefix_token_ids)
    assert (res.token_starts, res.token_ends) == parse._offsets(CODEC.pieces(res.prefix_token_ids))
    want = [y for y, t in enumerate(res.prefix_token_ids) if CODEC.coord_bin(t) is not None]
    assert res.prefix_coord_positions == want  # the whole tokens' positions come from the rollout's coord index
    # the prefix's scan is taken from the rollout's scan, not scanned again: it equals a scan of the prefix
    assert res.prefix_scan == scan_object(res.prefix_text, res.prefix_text.index("{"))
    if "{" in text:
        assert text.startswith(res.prefix_text)
        # whole original tokens, then at most one cut token re-encoded from its kept part
        j = next(
            (k for k, (a, b) in enumerate(zip(res.prefix_token_ids, ids)) if a != b),
            min(len(res.prefix_token_ids), len(ids)),
        )
        rest = res.prefix_text[len("".join(CODEC.pieces(ids[:j]))) :]
        assert res.prefix_token_ids[j:] == CODEC.encode(rest)
        assert not rest or len(rest) < len(CODEC.pieces([ids[j]])[0])
    else:
        assert res.prefix_text == "{" and res.truncated
    # append-ready: closing it, or appending an FN entry, gives exactly one closed top-level object
    brace = res.prefix_text.index("{")
    for fn in ([], [CAT]):
        full = res.prefix_text + fn_append_fragment(res.prefix_text, fn, res.max_object_index + 1)
        scan = scan_object(full, brace)
        assert scan.status == "closed" and scan.end == len(full)
    assert res.n_total_objects == len(res.objects) + res.n_dropped
    for o in res.objects:
        assert [CODEC.coord_bin(res.prefix_token_ids[p]) for p in o.coord_positions] == list(o.bbox)
        assert o.index <= res.max_object_index and o.span[1] <= len(res.prefix_text)


@settings(max_examples=10_000, **FUZZ)
@given(st.binary(max_size=40), st.booleans())
def test_parser_on_arbitrary_text(data, im_end):
    ids = CODEC.encode(text_from(data)) + ([CODEC.im_end_id] if im_end else [])
    check_parse(ids, parse_rollout(ids, CODEC))


@settings(max_examples=10_000, **FUZZ)
@given(st.binary(max_size=60))
def test_parser_on_arbitrary_token_ids(data):
    ids = ids_from(data)
    check_parse(ids, parse_rollout(ids, CODEC))


def test_fuzz_inputs_reach_every_outcome():
    """Guard against a fuzz that only ever sees garbage: the tables produce valid objects and drops too."""
    rng, seen = random.Random(0), set()
    for _ in range(2000):
        data = rng.randbytes(rng.randrange(40))
        for ids in (CODEC.encode(text_from(data)), ids_from(data)):
            res = parse_rollout(ids, CODEC)
            seen |= {r for r, c in res.drops.items() if c} | ({"valid"} if res.objects else set())
            seen |= {"truncated"} if res.truncated else {"malformed"} if res.malformed else {"closed"}
    assert {"valid", *DROP_REASONS, "truncated", "malformed", "closed"} <= seen


# --------------------------------------------------------------------------------------------- Channel-B


def _object(d: Draw, base: list[dict]) -> dict:
    if base and d.byte() % 3 != 2:  # mostly a jittered copy of a GT box (also once the bytes run out)
        src = d.pick(base)["bbox_2d"]
        bbox = [min(max(v + d.byte() % 9 - 4, 0), MAX_BIN) for v in src]
    else:
        bbox = [min(d.byte() * 4, MAX_BIN) for _ in range(4)]
    bbox = [min(bbox[0], bbox[2]), min(bbox[1], bbox[3]), max(bbox[0], bbox[2]), max(bbox[1], bbox[3])]
    return {"desc": d.pick(DESCS[:-1]), "bbox_2d": bbox}


def _mutate(edits, text: str) -> str:
    for op, where, frag in edits:
        k = where * len(text) // 256
        text = text[:k] if op == 0 else text[:k] + text[k + 1 :] if op == 1 else text[:k] + frag + text[k:]
    return text


def _mutated_case(data: bytes):
    """(ids, gt, field order, desc weight, struct multiplier) of a rendered answer with random edits."""
    d = Draw(data)
    n_gt, n_pred, order, im_end, desc_w, mult = (
        d.byte() % 5,
        d.byte() % 5,
        d.pick(ORDERS),
        d.byte() % 2,
        d.byte() / 128,
        d.byte() / 50,
    )
    edits = [(d.byte() % 3, d.byte(), d.pick(FRAGMENTS)) for _ in range(d.byte() % 4)]
    gt = [_object(d, []) for _ in range(n_gt)]
    pred = [_object(d, gt) for _ in range(n_pred)]
    text = _mutate(edits, render_answer(pred, order, "given"))
    return CODEC.encode(text) + ([CODEC.im_end_id] if im_end else []), gt, order, desc_w, mult


def _channel_b(ids, gt, order, desc_w, mult, max_len=120):
    parse = parse_rollout(ids, CODEC)
    match = match_boxes(
        [o.bbox for o in parse.objects],
        [g["bbox_2d"] for g in gt],
        candidate_top_k=3,
        gate=0.3,
        resolution=64,
        fp_cost=0.5,
        fn_cost=2.0,
    )
    prompt = CODEC.encode("<|im_start|>user\nscene<|im_end|>\n<|im_start|>assistant\n")
    seg = build_channel_b_segment(
        prompt,
        parse,
        gt,
        match,
        CODEC,
        field_order=order,
        desc_ce_weight=desc_w,
        drop_invalid_struct_ce_multiplier=mult,
        sample_id="f",
        max_len=max_len,
    )
    return prompt, parse, match, seg


@settings(max_examples=3_000, **FUZZ)
@given(st.binary(max_size=96))
def test_channel_b_on_mutated_answers(data):
    ids, gt, order, desc_w, mult = _mutated_case(data)
    prompt, parse, match, seg = _channel_b(ids, gt, order, desc_w, mult)
    assert isinstance(seg, (Segment, Drop))
    if isinstance(seg, Drop):
        assert seg.reason == "too_long", seg  # nothing else may fail on well-formed GT
        return
    y = seg.input_ids[seg.prompt_len :]
    assert seg.input_ids[: seg.prompt_len] == prompt and y[-1] == CODEC.im_end_id
    # the rollout's tokens are kept verbatim except the last, re-encoded with the fragment (fused BPE boundary)
    keep = max(len(parse.prefix_token_ids) - 1, 0)
    assert y[:keep] == parse.prefix_token_ids[:keep]
    answer = "".join(CODEC.pieces(y[:-1]))
    assert answer.startswith(parse.prefix_text)
    scan = scan_object(answer, answer.index("{"))
    assert scan.status == "closed" and scan.end == len(answer)
    assert all(w == 0 for w in seg.ce_weights[: seg.prompt_len]) and seg.ce_weights[-1] == 1.0
    assert all(w == 0 for t, w in zip(seg.input_ids, seg.ce_weights) if CODEC.coord_bin(t) is not None)
    assert all(CODEC.coord_bin(seg.input_ids[p]) is not None for p in seg.coord_pos)
    assert seg.box_groups == ["prefix"] * len(match.pairs) + ["fn"] * len(match.fn_indices)
    assert seg.coord_bins[: 4 * len(match.pairs)] == [b for _, j, _ in match.pairs for b in gt[j]["bbox_2d"]]
    fn_bins = sorted(tuple(gt[j]["bbox_2d"]) for j in match.fn_indices)
    assert (
        sorted(tuple(seg.coord_bins[k : k + 4]) for k in range(4 * len(match.pairs), len(seg.coord_bins), 4)) == fn_bins
    )
    assert set(seg.ce_weights) <= {0.0, 1.0, desc_w, min(max(mult, 1.0), 4.0)}


NEVER = re.compile(r"(?!)")  # a pattern that matches nothing: turns the scanner's fast paths off


@contextlib.contextmanager
def fast_paths_off(canonical: bool):
    """Every regex fast path of the scanner off (flat containers, member heads, flat members) and, with
    `canonical`, parse.py's canonical-value regexes (which also read the FN entries' descs) and its run of canonical
    members (`_RUN_RE`)."""
    with (
        mock.patch.object(scan, "_FLAT_RE", {"{": NEVER, "[": NEVER}),
        mock.patch.object(scan, "_MEMBER_HEAD_RE", NEVER),
        mock.patch.object(scan, "_NEXT_HEAD_RE", NEVER),
        mock.patch.object(scan, "_FLAT_MEMBER_RE", NEVER),
        mock.patch.object(scan, "_NEXT_FLAT_MEMBER_RE", NEVER),
        mock.patch.object(
            parse, "_CANONICAL_RE", {"desc_first": NEVER, "geometry_first": NEVER} if canonical else parse._CANONICAL_RE
        ),
        mock.patch.object(parse, "_RUN_RE", {"first": NEVER, "next": NEVER} if canonical else parse._RUN_RE),
    ):
        yield


def _all_scans(text: str) -> list:
    return [scan_object(text, i) for i, c in enumerate(text) if c == "{"]


@settings(max_examples=5_000, **FUZZ)
@given(st.binary(max_size=48))
def test_scanner_fast_paths_give_the_bracket_matchers_result(data):
    """parse.py matches flat containers and `[, ]"key":` heads with one regex each; every scan (from every `{`)
    equals the member-by-member, bracket-matching scan on fragment soups and documents."""
    text = text_from(data)
    fast = _all_scans(text)
    with fast_paths_off(canonical=False):
        slow = _all_scans(text)
    assert fast == slow, text


@settings(max_examples=5_000, **FUZZ)
@given(st.binary(max_size=60), st.booleans())
def test_parser_fast_paths_give_the_general_result(data, as_text):
    """parse.py reads canonically written object values with one regex (`_CANONICAL_RE`) and scans with the
    fast paths above; the parse equals the one with all of them off (JSON-loaded values, bracket matching)."""
    ids = CODEC.encode(text_from(data)) + [CODEC.im_end_id] if as_text else ids_from(data)
    fast = parse_rollout(ids, CODEC)
    with fast_paths_off(canonical=True):
        slow = parse_rollout(ids, CODEC)
    assert fast == slow, ids


@settings(max_examples=1_000, **FUZZ)
@given(st.binary(max_size=40))
def test_a_continued_scan_is_the_scan_of_the_whole_text(data):
    """targets.py continues the prefix's scan over the appended text instead of rescanning the answer: from
    every `{` and every cut where the scan of text[:cut] is open at member level, continuing it over the whole
    text gives scan_object's result, and leaves the prefix's scan as it was."""
    text = text_from(data)
    for b in [i for i, c in enumerate(text) if c == "{"]:
        whole = scan_object(text, b)
        for cut in range(b + 1, len(text) + 1):
            part = scan_object(text[:cut], b)
            if part.status == "open" and part.state in ("key_or_close", "key", "after"):
                before = repr(part)
                assert continue_scan(text, part) == whole, (text, cut)
                assert repr(part) == before


@settings(max_examples=1_000, **FUZZ)
@given(st.binary(max_size=40))
def test_a_canonical_run_is_read_as_the_scanner_and_canonical_value_read_it(data):
    """parse.py and targets.py read a leading run of canonically written members one regex match each
    (`continue_canonical`): from every `{` and every cut open at member level, the same scan as continuing member by
    member, and for each member the run added, canonical_value's result."""
    text = text_from(data)
    for b in [i for i, c in enumerate(text) if c == "{"]:
        for cut in range(b + 1, len(text) + 1):
            part = scan_object(text[:cut], b)
            if part.status == "open" and part.state in ("key_or_close", "key", "after"):
                got, run = parse.continue_canonical(text, part)
                assert got == continue_scan(text, part), (text, cut)
                added = got.members[len(part.members) : len(part.members) + len(run)]
                assert run == [parse.canonical_value(text, m) for m in added], (text, cut)


def test_only_a_scan_open_at_member_level_continues():
    for text in ('{"a": "x', '{"a"', '{"a": 1}', '{"a": 1 1'):
        with pytest.raises(ValueError, match="member level"):
            continue_scan(text + " ", scan_object(text, 0))
        with pytest.raises(ValueError, match="member level"):
            parse.continue_canonical(text + " ", scan_object(text, 0))


@settings(max_examples=2_000, **FUZZ)
@given(st.binary(max_size=96))
def test_channel_b_fast_paths_give_the_general_segment(data):
    """With every regex fast path off (the scanner's flat members and heads, the canonical values, which also read
    the FN entries' descs), the same Channel-B segment or drop on mutated answers."""
    case = _mutated_case(data)
    fast = _channel_b(*case, max_len=None)[3]
    with fast_paths_off(canonical=True):
        slow = _channel_b(*case, max_len=None)[3]
    assert isinstance(fast, Segment) and fast == slow, case
