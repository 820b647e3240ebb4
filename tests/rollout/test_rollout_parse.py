"""Strict token-aligned parser: the behaviours the strict-parse contract pins down, on the straddling ToyCodec."""

import functools
import json
from pathlib import Path

import pytest

from toolkit.data.coords import coord_token
from toolkit.data.render import dumps_payload, object_payload
from toolkit.rollout.codec import ToyCodec
from toolkit.rollout.parse import DROP_REASONS, RetokenizeError, _CoordIndex, parse_rollout
from toolkit.rollout.scan import scan_object


def entry(n, desc="cat", bbox=(10, 20, 30, 40), field_order="desc_first"):
    return f'"object_{n}": ' + dumps_payload(object_payload(desc, bbox, field_order))


def body(*entries):
    return "{" + ", ".join(entries) + "}"


def parse_text(codec, text, im_end=True):
    return parse_rollout(codec.encode(text) + ([codec.im_end_id] if im_end else []), codec)


def check_prefix(codec, res):
    """The invariants every ParseResult keeps (also asserted by the fuzz tests)."""
    assert "".join(codec.pieces(res.prefix_token_ids)) == res.prefix_text
    assert [res.prefix_text[s:e] for s, e in res.token_offsets] == codec.pieces(res.prefix_token_ids)
    assert res.prefix_text.rstrip()[-1] in "{}"
    assert res.n_total_objects == len(res.objects) + res.n_dropped
    for o in res.objects:
        assert [codec.coord_bin(res.prefix_token_ids[p]) for p in o.coord_positions] == list(o.bbox)
        s, e = o.span
        assert res.prefix_text[s:e].startswith(f'"object_{o.index}"') and res.prefix_text[e - 1] == "}"
        assert json.loads('"' + res.prefix_text[o.desc_span[0] : o.desc_span[1]] + '"') == o.desc


def test_canonical_answer_roundtrip_keeps_appearance_order(codec):
    text = body(entry(10, "cat", (1, 2, 3, 4)), entry(2, "dog", (5, 6, 7, 8)))
    res = parse_text(codec, text)
    check_prefix(codec, res)
    assert [o.index for o in res.objects] == [10, 2]  # never re-sorted
    assert [o.desc for o in res.objects] == ["cat", "dog"]
    assert [o.bbox for o in res.objects] == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert not res.truncated and not res.malformed and not res.fallback and res.stopped_at_im_end
    assert res.max_object_index == 10 and res.n_dropped == 0


def test_prefix_drops_only_the_final_brace_even_when_fused(codec):
    text = body(entry(1), entry(2))
    ids = codec.encode(text)
    assert codec.pieces(ids)[-1] == '"]}}'  # the closing brace is fused with the object's end
    res = parse_rollout(ids + [codec.im_end_id], codec)
    assert res.prefix_text == text[:-1]
    assert res.prefix_text.endswith('"]}') and not res.prefix_text.endswith("}}")
    assert codec.pieces(res.prefix_token_ids)[-1] == '"]}'  # only the cut token was re-encoded
    assert res.prefix_token_ids[:-1] == ids[:-1]


def test_cut_inside_straddling_separator_token(codec):
    text = body(entry(1), entry(2, desc='x"y'))[:-20]  # the second object is truncated
    ids = codec.encode(text)
    assert '"]}, "' in codec.pieces(ids)
    res = parse_rollout(ids, codec)
    check_prefix(codec, res)
    assert res.truncated and [o.index for o in res.objects] == [1]
    assert res.prefix_text == body(entry(1))[:-1]
    assert res.drops["key_invalid"] == 1  # the incomplete tail object
    assert res.max_object_index == 1  # the cut-off key does not count


@pytest.mark.parametrize("cut", range(1, 300, 7))
def test_truncated_tails_are_suffix_trimmed(codec, cut):
    entries = [entry(1, "cat", (1, 2, 3, 4)), entry(2, "dog", (5, 6, 7, 8)), entry(3, "cow", (9, 9, 9, 9))]
    full = body(*entries)
    text = full[: len(full) - cut]
    res = parse_text(codec, text, im_end=False)
    check_prefix(codec, res)
    assert res.truncated
    complete = [n for n in (1, 2, 3) if text.startswith(body(*entries[:n])[:-1])]
    assert [o.index for o in res.objects] == complete
    assert res.prefix_text == (body(*entries[: len(complete)])[:-1] if complete else "{")


def test_invalid_objects_dropped_without_repair(codec):
    bad = {
        "key_invalid": '"object_3": {"desc": "a" "bbox_2d": []}',
        "missing_desc": '"object_4": {"bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"]}',
        "missing_geom": '"object_5": {"desc": "a"}',
        "unknown_geom": '"object_6": {"desc": "a", "bbox_3d": [1]}',
        "poly_unsupported": '"object_7": {"desc": "a", "poly": ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", '
        '"<|coord_4|>", "<|coord_5|>", "<|coord_6|>"]}',
        "wrong_arity": '"object_8": {"desc": "a", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>"]}',
        "non_coord_token": '"object_9": {"desc": "a", "bbox_2d": ["<|coord_1|>", "12", "<|coord_3|>", "<|coord_4|>"]}',
        "bbox_invalid": '"object_10": {"desc": "a", "bbox_2d": ["<|coord_5|>", "<|coord_2|>", "<|coord_3|>", '
        '"<|coord_4|>"]}',
    }
    text = body(entry(1), *bad.values(), entry(11))
    res = parse_text(codec, text)
    check_prefix(codec, res)
    assert [o.index for o in res.objects] == [1, 11]
    assert res.drops == dict.fromkeys(DROP_REASONS, 1)
    assert res.prefix_text == text[:-1]  # the prefix keeps the invalid objects verbatim (no repair)


@pytest.mark.parametrize(
    "value",
    [
        '{"desc": "a", "desc": "b", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"]}',
        '{"desc": "a", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"], "score": 1}',
        '{"desc": "a", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}',
    ],
)
def test_duplicate_extra_keys_and_unquoted_coords_are_key_invalid(codec, value):
    res = parse_text(codec, body(f'"object_1": {value}'))
    assert res.objects == [] and res.drops["key_invalid"] == 1


def test_coord_spelled_with_plain_characters_is_not_a_coord_token(codec):
    spelled = [codec.char_base + ord(ch) for ch in coord_token(7)]
    ids = (
        codec.encode('{"object_1": {"desc": "a", "bbox_2d": ["')
        + spelled
        + codec.encode('", "<|coord_2|>", "<|coord_9|>", "<|coord_4|>"]}}')
    )
    res = parse_rollout(ids, codec)
    assert "".join(codec.pieces(ids)).count("<|coord_7|>") == 1
    assert res.objects == [] and res.drops["non_coord_token"] == 1


def test_max_index_counts_invalid_and_non_dict_keys(codec):
    text = body(entry(1), '"object_3": {"desc": ""}', '"object_4": 5', entry(2))
    res = parse_text(codec, text)
    assert [o.index for o in res.objects] == [1, 2]
    assert res.max_object_index == 4  # the next FN key is object_5, not object_3
    assert res.drops["key_invalid"] == 1 and res.drops["missing_desc"] == 1


def test_non_object_keys_do_not_count_towards_the_index(codec):
    res = parse_text(codec, body(entry(2), '"obj_9": {"desc": "a"}', '"object_07": {}'))
    assert res.max_object_index == 2 and res.drops["key_invalid"] == 2


def test_im_end_is_a_hard_stop(codec):
    text = body(entry(1))
    ids = codec.encode(text) + [codec.im_end_id] + codec.encode(', "object_2": {}}')
    res = parse_rollout(ids, codec)
    assert res.stopped_at_im_end and not res.truncated and res.rollout_len == len(ids)
    assert "<|im_end|>" not in res.prefix_text and res.prefix_text == text[:-1]


def chars(codec, text):
    """Ids spelling `text` one plain character at a time (never a special token)."""
    return [codec.char_base + ord(ch) for ch in text]


def test_braces_and_im_end_text_inside_desc_strings_are_ignored(codec):
    tricky = 'a}b{c]"<|im_end|>\\'
    text = body(entry(1, tricky), entry(2, "}}"))
    head, tail = text.split("<|im_end|>")
    ids = codec.encode(head) + chars(codec, "<|im_end|>") + codec.encode(tail)
    res = parse_rollout(ids, codec)
    check_prefix(codec, res)
    assert [o.desc for o in res.objects] == [tricky, "}}"]
    scan = scan_object(text, 0)
    assert scan.status == "closed" and scan.end == len(text) and len(scan.members) == 2


def test_no_brace_fallback(codec):
    res = parse_text(codec, "hello")
    assert res.prefix_text == "{" and res.prefix_token_ids == codec.encode("{")
    assert res.truncated and res.fallback and res.objects == [] and res.n_total_objects == 0


@pytest.mark.parametrize(
    "text, prefix, truncated, malformed",
    [
        ("{", "{", True, False),
        ("{}", "{", False, False),
        ('xx {"object_1": ', "xx {", True, False),
        ('{"object_1": {"desc": "a"}, oops}', '{"object_1": {"desc": "a"}', False, True),
        ('{"object_1": {"desc": "a"]}', "{", False, True),
        ('{"object_1": [1, 2], "object_2": 3}', "{", False, False),
    ],
)
def test_prefix_falls_back_to_after_the_first_brace(codec, text, prefix, truncated, malformed):
    res = parse_text(codec, text)
    check_prefix(codec, res)
    assert res.prefix_text == prefix and res.objects == []
    assert (res.truncated, res.malformed, res.fallback) == (truncated, malformed, "}" not in prefix)


def test_syntax_error_keeps_earlier_objects_and_stops(codec):
    text = body(entry(1))[:-1] + ' "object_2": ' + dumps_payload(object_payload("dog", (1, 1, 2, 2))) + "}"
    res = parse_text(codec, text)
    assert res.malformed and [o.index for o in res.objects] == [1]
    assert res.drops["key_invalid"] == 1 and res.prefix_text == body(entry(1))[:-1]


def test_trailing_text_after_close_is_ignored(codec):
    text = body(entry(1)) + ' and {"object_9": {}}'
    res = parse_text(codec, text)
    assert not res.truncated and res.max_object_index == 1 and res.prefix_text == body(entry(1))[:-1]


def test_retokenize_invariant_raises_clearly(codec):
    class Lossy(type(codec)):
        def encode(self, text):
            return super().encode(text.replace("}", ")"))

    lossy = Lossy()
    with pytest.raises(RetokenizeError, match="Failed to retokenize a token-internal cut boundary"):
        parse_rollout(codec.encode(body(entry(1))), lossy)


def test_geometry_first_objects_parse(codec):
    res = parse_text(codec, body(entry(1, "cat", (1, 2, 3, 4), "geometry_first")))
    check_prefix(codec, res)
    assert [(o.desc, o.bbox) for o in res.objects] == [("cat", (1, 2, 3, 4))]


# ---- non-canonical coordinate text: always dropped as non_coord_token --------------------------------
# JSON-valid spellings around / instead of one `<|coord_k|>`: json.loads may turn some into the canonical
# text (`\\u0031`, `\\u003c`), which only the token check can then catch.
_JUNK = ["", " ", "\\n", "\\t", "\\r", "x", "0", ",", "\\u0020", "<|coord_2|>"]
_CORES = [
    "<|coord_{k}|>",
    "<|coord_0{k}|>",
    "<|coord_{k}0000|>",
    "<|coord_-{k}|>",
    "<|coord_|>",
    "<|COORD_{k}|>",
    "<|coord_{k}|",
    "|coord_{k}|>",
    "<|coord_\\u0031|>",
    "\\u003c|coord_{k}|>",
    "<|coord_{k} |>",
    "coord_{k}",
    "<|coord_{k}|><|coord_{k}|>",
    "<|coord_\\u0661|>",
]


@functools.lru_cache(maxsize=1)
def _real_codec():
    from toolkit.data.tokenizer import load_tokenizer
    from toolkit.rollout.codec import HFTokenCodec

    return HFTokenCodec(load_tokenizer(str(Path(__file__).resolve().parents[2] / "assets" / "tokenizer")))


@pytest.fixture(scope="module")
def real_codec():
    return _real_codec()


def test_coord_with_trailing_newline_is_non_coord_token(codec, real_codec):
    """`"<|coord_1|>\\n"` was bin 1 under a `$`-anchored regex; the reference drops it as non_coord_token."""
    from toolkit.data.coords import parse_coord_token

    assert parse_coord_token("<|coord_1|>\n") is None and parse_coord_token("<|coord_1|>") == 1
    for c in (codec, real_codec):
        text = body(
            '"object_1": {"desc": "a", "bbox_2d": ["<|coord_1|>\\n", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"]}'
        )
        res = parse_text(c, text)
        assert res.objects == [] and res.drops["non_coord_token"] == 1, c


@pytest.mark.parametrize("real", [False, True], ids=["toy", "real_tokenizer"])
def test_fuzz_any_non_canonical_coordinate_text_is_dropped_as_non_coord_token(real):
    """Every junk-before × spelling × junk-after combination (a random bin, a rotating bbox slot)."""
    import itertools
    import random

    c = _real_codec() if real else ToyCodec()
    rng = random.Random(0)
    n_bad = 0
    for before, core, after in itertools.product(_JUNK, _CORES, _JUNK):
        k, slot = rng.randrange(1000), rng.randrange(4)
        value = before + core.format(k=k) + after
        bins = ['"<|coord_1|>"', '"<|coord_2|>"', '"<|coord_3|>"', '"<|coord_4|>"']
        bins[slot] = '"' + value + '"'
        res = parse_text(c, body(entry(1), '"object_2": {"desc": "a", "bbox_2d": [' + ", ".join(bins) + "]}"))
        check_prefix(c, res)
        if value == coord_token(k):  # the canonical spelling parses
            assert [o.index for o in res.objects] == [1, 2] and res.n_dropped == 0
            continue
        n_bad += 1
        assert [o.index for o in res.objects] == [1], value
        assert res.drops == {**dict.fromkeys(DROP_REASONS, 0), "non_coord_token": 1}, (value, res.drops)
    assert n_bad == len(_JUNK) ** 2 * len(_CORES) - 1


def test_coord_index_finds_the_coord_tokens_of_every_span_as_the_per_token_rule():
    """`_CoordIndex.within` bisects for the coord tokens of a bbox array; the rule it replaces tests every token:
    p with a <= starts[p] < b, ends[p] <= b and a coord id. Random token streams with empty pieces (an id a
    literal vocabulary does not know), every span."""
    import random
    from itertools import accumulate

    codec, rng = ToyCodec(), random.Random(0)
    coord_ids = list(codec.coord_token_ids)
    for _ in range(200):
        n = rng.randrange(30)
        ids = [rng.choice(coord_ids) if rng.random() < 0.4 else rng.randrange(2000, 3000) for _ in range(n)]
        ends = list(accumulate(rng.choice([0, 1, 1, 2, 5, 11]) for _ in range(n)))
        starts = [0, *ends[:-1]]
        index = _CoordIndex(ids, starts, ends, codec)
        for a in range((ends[-1] if n else 0) + 2):
            for b in range(a, (ends[-1] if n else 0) + 2):
                pos = [p for p in range(n) if a <= starts[p] < b and ends[p] <= b and ids[p] in coord_ids]
                assert index.within(a, b) == (pos, [codec.coord_bin(ids[p]) for p in pos]), (ids, ends, a, b)


def test_int_list_and_first_stop_equal_the_straightforward_rules():
    """parse_rollout copies a list of plain ints as it is (`_int_list`) and finds the first stop id with one
    `list.index` per stop id (`_first_stop`): the same as `list(map(int, ids))` and the first index of any stop id."""
    import random

    import numpy as np

    from toolkit.rollout.parse import _first_stop, _int_list

    rng = random.Random(2)
    for _trial in range(500):
        ids = [rng.randrange(8) for _ in range(rng.randrange(12))]
        given = rng.choice([ids, tuple(ids), np.array(ids, dtype=np.int64), [*ids[:1], *map(bool, ids[1:2]), *ids[2:]]])
        got = _int_list(given)
        assert got == list(map(int, given)) and {*map(type, got)} <= {int}, given
        assert got is not given
        stops = set(rng.sample(range(8), rng.randrange(4)))
        want = min((k for k, t in enumerate(got) if t in stops), default=len(got))
        assert _first_stop(got, stops) == want, (got, stops)
