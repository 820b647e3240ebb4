"""Strict, token-aligned parsing of a rollout into an append-ready prefix and its valid objects.

Owns `parse_rollout`; the JSON member scanner it reads with is scan.py (shared with targets.py).
No repair: an object is either taken exactly as emitted or dropped into one reason bucket.
Pure Python + the codec; imports nothing heavy.

Frames: character offsets index `"".join(codec.pieces(ids))` of the rollout cut at its first
`<|im_end|>`; token positions index `ParseResult.prefix_token_ids`.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, compress, count, zip_longest

from toolkit.data.coords import BIN_PATTERN, parse_coord_token
from toolkit.rollout.scan import Member, ObjectScan, continue_scan, fields_of, scan_object
from toolkit.rollout.token_spans import coord_positions

DROP_REASONS = (
    "key_invalid",  # not `object_N`, value not a complete loadable dict, duplicate/extra keys, syntax error
    "missing_desc",
    "missing_geom",
    "unknown_geom",
    "poly_unsupported",  # bbox-only Stage-2: a `poly` object is dropped
    "wrong_arity",
    "non_coord_token",  # a bbox entry that is not exactly one `<|coord_k|>` token inside quotes
    "bbox_invalid",  # x2 < x1 or y2 < y1
)
_KEY_RE = re.compile(r'"object_([1-9][0-9]{0,17})"')
# An object value exactly as toolkit/data/render.py writes it, one pattern per field order; groups: the desc's
# content, the bbox array, its four bins.
_BOX = r"(\[" + ", ".join([r'"<\|coord_(' + BIN_PATTERN + r')\|>"'] * 4) + r"\])"
_DESC = r'"([^"\\\x00-\x1f]*)"'
_CANONICAL_RE = {
    "desc_first": re.compile(r'\{"desc": ' + _DESC + r', "bbox_2d": ' + _BOX + r"\}", re.S),
    "geometry_first": re.compile(r'\{"bbox_2d": ' + _BOX + r', "desc": ' + _DESC + r"\}", re.S),
}
_CANONICAL_GROUPS = {"desc_first": (1, 2, (3, 4, 5, 6)), "geometry_first": (6, 1, (2, 3, 4, 5))}
# A whole member in the renderer's spelling, `"object_N": ` and a canonical value, at member level with the scanner's
# whitespace: the first one (after `{`) or a next one (`,` first). A run of such members is read one match each
# (`continue_canonical`): the same members the scanner lists (its flat-member regexes match the same text) and the
# values canonical_value reads, instead of scanning each member and then matching its value again.
# Groups: the key with its quotes, N, the value, then the value's groups (`_RUN_GROUPS`, per field order).
_RUN_HEAD = r'("object_([1-9][0-9]{0,17})")[ \t\n\r]*+:[ \t\n\r]*+'
_RUN_VALUE = "(" + _CANONICAL_RE["desc_first"].pattern + "|" + _CANONICAL_RE["geometry_first"].pattern + ")"
_RUN_RE = {
    "first": re.compile(r"[ \t\n\r]*+" + _RUN_HEAD + _RUN_VALUE, re.S),
    "next": re.compile(r"[ \t\n\r]*+,[ \t\n\r]*+" + _RUN_HEAD + _RUN_VALUE, re.S),
}
_RUN_GROUPS = {"desc_first": (4, 5, (6, 7, 8, 9)), "geometry_first": (15, 10, (11, 12, 13, 14))}


class RetokenizeError(RuntimeError):
    """The kept part of a token cut by the prefix boundary did not re-encode to the same text."""


# ---------------------------------------------------------------------------------------------------
# parse_rollout


@dataclass(frozen=True)
class ParsedObject:
    """A valid rollout object.

    index:           N of its `object_N` key.
    bbox:            (x1, y1, x2, y2) bins.
    coord_positions: indices into `prefix_token_ids` of its 4 coord tokens, in bbox order.
    span:            characters from the key's opening quote to just after the value's `}`.
    desc_span:       characters of the desc string's content (quotes excluded).
    """

    index: int
    desc: str
    bbox: tuple[int, int, int, int]
    coord_positions: tuple[int, int, int, int]
    span: tuple[int, int]
    desc_span: tuple[int, int]


@dataclass
class ParseResult:
    """What `parse_rollout` returns. The prefix is append-ready: it ends right after the last complete
    object value (no closing `}`), or right after the first `{`, or is `encode("{")` when there was none.

    objects:   the valid objects in appearance order (never re-sorted by N).
    drops:     count per DROP_REASONS bucket; invalid entries stay verbatim in the prefix (no repair).
    n_total_objects: member-level entries seen (len(objects) + sum(drops)), incl. a cut-off last one.
    truncated: the rollout ended before its top-level object closed (or had no `{` at all).
    malformed: a member-level syntax error stopped the scan (the rest of the rollout was discarded).
    fallback:  no complete object member was kept: the prefix ends right after an (opening) `{`.
    max_object_index: the largest N over every `object_N` key kept in the prefix, valid or not (0 if none).
    prefix_scan: `scan_object(prefix_text, prefix_text.find("{"))`, taken from the rollout's scan (targets.py
        continues it over the appended text instead of scanning the prefix again).
    """

    prefix_token_ids: list[int]
    prefix_text: str
    token_starts: list[int]  # where each prefix token's piece starts in prefix_text
    token_ends: list[int]  # and ends
    prefix_coord_positions: list[int]  # indices into prefix_token_ids of every coord token, valid objects' or not
    objects: list[ParsedObject]
    drops: dict[str, int]
    n_total_objects: int
    truncated: bool
    malformed: bool
    fallback: bool
    max_object_index: int
    rollout_len: int
    stopped_at_im_end: bool
    prefix_scan: ObjectScan = field(repr=False, compare=False)

    @property
    def token_offsets(self) -> list[tuple[int, int]]:
        """(start, end) of each prefix token's piece in prefix_text."""
        return list(zip(self.token_starts, self.token_ends))

    @property
    def n_dropped(self) -> int:
        return sum(self.drops.values())


# Over 60 lines: the parse read top to bottom (stop, token frame, scan, members, prefix).
def parse_rollout(token_ids: Sequence[int], codec, *, extra_stop_ids: Iterable[int] = ()) -> ParseResult:
    """Strictly parse a rollout's token ids; never raises on any token sequence.

    Args:
        token_ids: the generated ids (prompt excluded). Parsing stops at the first `<|im_end|>`
            (or any id in `extra_stop_ids`).
        codec: a `TokenCodec`.

    Raises:
        RetokenizeError: only if the codec cannot re-encode the kept part of a cut token to the same
            text (an invariant of the codec, not of the input).
    """
    ids = _int_list(token_ids)
    n_rollout = len(ids)
    stop = _first_stop(ids, {codec.im_end_id, *(int(t) for t in extra_stop_ids)})
    ids = ids[:stop]
    pieces = codec.pieces(ids)
    starts, ends = _offsets(pieces)
    text = "".join(pieces)
    drops = dict.fromkeys(DROP_REASONS, 0)
    brace = text.find("{")
    if brace < 0:
        return _without_object(codec, drops, n_rollout, stopped_at_im_end=stop < n_rollout)
    scan, run_values = continue_canonical(text, ObjectScan(brace, end=brace + 1))  # scan_object(text, brace)
    n_kept = next((k for k in range(len(scan.members), 0, -1) if scan.members[k - 1].kind == "object"), 0)
    cut = scan.members[n_kept - 1].value_end if n_kept else brace + 1
    coords = _CoordIndex(ids, starts, ends, codec)
    objects, max_index = [], 0
    for mem, got in zip_longest(scan.members, run_values):  # got: the value already read (None: not yet)
        if got is not None:  # a run member: an object value before the cut, its key `"object_N"` (`_RUN_RE`)
            index = int(mem.key_raw[8:-1])
            max_index = max(max_index, index)
            obj, reason = _checked(index, mem, got, coords)
        elif 0 < mem.value_end <= cut:  # kept
            key = _KEY_RE.fullmatch(mem.key_raw)
            if key:
                max_index = max(max_index, int(key.group(1)))
            obj, reason = _validate(text, mem, key, coords)
        else:
            obj, reason = None, "key_invalid"
        if obj is None:
            drops[reason] += 1
        else:
            objects.append(obj)
    n_total = len(scan.members)
    if scan.status == "error" and scan.state in ("key_or_close", "key", "after"):  # junk between members
        drops["key_invalid"] += 1
        n_total += 1
    n_whole, prefix_ids, prefix_starts, prefix_ends = _cut_tokens(ids, pieces, starts, ends, cut, codec)
    whole_coords = coords.pos[: bisect.bisect_left(coords.pos, n_whole)]  # the rollout's own tokens: listed above
    return ParseResult(
        prefix_token_ids=prefix_ids,
        prefix_text=text[:cut],
        token_starts=prefix_starts,
        token_ends=prefix_ends,
        prefix_coord_positions=whole_coords + coord_positions(prefix_ids, codec, n_whole),
        objects=objects,
        drops=drops,
        n_total_objects=n_total,
        truncated=scan.status == "open",
        malformed=scan.status == "error",
        fallback=not n_kept,
        max_object_index=max_index,
        rollout_len=n_rollout,
        stopped_at_im_end=stop < n_rollout,
        # the scan of text[:cut]: the members up to the last object value, open after it (or just after `{`)
        prefix_scan=ObjectScan(brace, scan.members[:n_kept], "open", cut, "after" if n_kept else "key_or_close"),
    )


def continue_canonical(text: str, scan: ObjectScan) -> tuple[ObjectScan, list]:
    """(`continue_scan(text, scan)`, canonical_value's result for each member of the leading run of canonical members
    it adds): the run read with one `_RUN_RE` match per member, the rest scanned on from its end (continuing from
    member level gives the scan of the whole text). The results index the new members: the k-th is member
    `len(scan.members) + k`. targets.py reads the FN entries' descs with it."""
    if scan.status != "open" or scan.state not in ("key_or_close", "key", "after"):
        return continue_scan(text, scan), []  # continue_scan's ValueError
    members, values, i = list(scan.members), [], scan.end
    m = _RUN_RE["next" if scan.state == "after" else "first"].match(text, i)
    while m is not None:
        members.append(Member(m.group(1), m.start(1), m.start(3), m.end(), "object"))
        values.append(_canonical_read(m, _RUN_GROUPS["desc_first" if m.start(4) >= 0 else "geometry_first"]))
        i = m.end()
        m = _RUN_RE["next"].match(text, i)
    state = "after" if values else scan.state
    return continue_scan(text, ObjectScan(scan.start, members, "open", i, state)), values


def _int_list(token_ids: Sequence[int]) -> list[int]:
    """`list(map(int, token_ids))`; a list of plain ints is copied as it is (`int` returns a plain int itself), after
    one C-level type check that costs half the `int` calls."""
    if type(token_ids) is list and {*map(type, token_ids)} <= {int}:
        return token_ids.copy()
    return list(map(int, token_ids))


def _first_stop(ids: list[int], stops: set[int]) -> int:
    """Index of the first id in `stops`, len(ids) if none (`list.index` per stop id: C, not a loop per token; one
    pass per stop id, not a membership test and then the index)."""
    first = len(ids)
    for t in stops:
        try:
            first = min(first, ids.index(t, 0, first))
        except ValueError:
            pass
    return first


def _without_object(codec, drops: dict, n_rollout: int, *, stopped_at_im_end: bool) -> ParseResult:
    """A rollout with no `{`: nothing to keep; the prefix is `encode("{")` (truncated, fallback)."""
    prefix_ids = codec.encode("{")
    prefix_pieces = _checked_pieces(codec, prefix_ids, "{")
    return ParseResult(
        prefix_ids,
        "{",
        *_offsets(prefix_pieces),
        coord_positions(prefix_ids, codec),
        [],
        drops,
        0,
        True,
        False,
        True,
        0,
        n_rollout,
        stopped_at_im_end,
        scan_object("{", 0),
    )


def _offsets(pieces: Sequence[str]) -> tuple[list[int], list[int]]:
    ends = list(accumulate(map(len, pieces)))
    return ([0, *ends[:-1]] if ends else []), ends


def _checked_pieces(codec, ids: list[int], text: str) -> list[str]:
    pieces = codec.pieces(ids)
    if "".join(pieces) != text:
        raise RetokenizeError(
            f"Failed to retokenize a token-internal cut boundary: {text!r} encoded to {ids} whose pieces "
            f"{pieces!r} do not reassemble it (the codec's encode/pieces are not inverse)"
        )
    return pieces


def _cut_tokens(ids, pieces, starts, ends, cut, codec) -> tuple[int, list[int], list[int], list[int]]:
    """(n whole, ids, starts, ends) of text[:cut]: the n whole tokens before the cut, then the re-encoded kept part
    of a cut token; the ids and their pieces' starts and ends."""
    k = bisect.bisect_left(starts, cut)  # tokens starting before the cut
    if k == 0 or ends[k - 1] <= cut:
        return k, ids[:k], starts[:k], ends[:k]
    at = starts[k - 1]
    kept = pieces[k - 1][: cut - at]
    new = codec.encode(kept)
    new_starts, new_ends = _offsets(_checked_pieces(codec, new, kept))
    return (
        k - 1,
        ids[: k - 1] + new,
        starts[: k - 1] + [at + s for s in new_starts],
        ends[: k - 1] + [at + e for e in new_ends],
    )


class _CoordIndex:
    """The rollout's coord tokens by position, so the ones inside a bbox array are found with a few bisects
    instead of testing every token of the array (docs/PERFORMANCE.md)."""

    def __init__(self, ids: list[int], starts: list[int], ends: list[int], codec):
        self.pos = list(compress(count(), map(codec.coord_bin_of.__contains__, ids)))
        self.bins = list(map(codec.coord_bin_of.__getitem__, map(ids.__getitem__, self.pos)))
        # the coord tokens' own starts and ends: three bisects over these (a few times shorter than the rollout's)
        self.starts = list(map(starts.__getitem__, self.pos))
        self.ends = list(map(ends.__getitem__, self.pos))

    def within(self, a: int, b: int) -> tuple[list[int], list[int]]:
        """(positions, bins) of the coord tokens p with a <= starts[p] < b and ends[p] <= b. Starts and ends never
        decrease, so those tokens are one range [i, j) of the coord tokens, found with three bisects."""
        i = bisect.bisect_left(self.starts, a)
        j = min(bisect.bisect_left(self.starts, b), bisect.bisect_right(self.ends, b))
        return self.pos[i:j], self.bins[i:j]


def _validate(text: str, mem: Member, key, coords: _CoordIndex) -> tuple[ParsedObject | None, str]:
    """A kept member → (ParsedObject, "") or (None, drop reason), checked in the bucket order."""
    if key is None or mem.kind != "object":
        return None, "key_invalid"
    return _checked(int(key.group(1)), mem, canonical_value(text, mem) or _general_value(text, mem), coords)


def _checked(index: int, mem: Member, got, coords: _CoordIndex) -> tuple[ParsedObject | None, str]:
    """`_validate` once the key (`object_<index>`) and the member's kind passed and its value was read (`got`: a drop
    reason or (desc, bins, bbox array span, desc content span))."""
    if isinstance(got, str):
        return None, got
    desc, bins, (a_start, a_end), desc_span = got
    pos, found = coords.within(a_start, a_end)
    if found != bins:  # each string must be one genuine coord token
        return None, "non_coord_token"
    if bins[2] < bins[0] or bins[3] < bins[1]:
        return None, "bbox_invalid"
    return ParsedObject(index, desc, tuple(bins), tuple(pos), (mem.key_start, mem.value_end), desc_span), ""


def canonical_value(text: str, mem: Member):
    """The value as the renderer writes it (either field order, a desc without escapes or control characters)
    read with one regex → (desc, bins, bbox array span, desc content span), a drop reason, or None for any
    other spelling (then `_general_value` decides, with the same outcome on canonical text). targets.py reads the FN
    entries' descs with it too."""
    order = "desc_first" if text.startswith('{"d', mem.value_start) else "geometry_first"
    m = _CANONICAL_RE[order].fullmatch(text, mem.value_start, mem.value_end)
    return None if m is None else _canonical_read(m, _CANONICAL_GROUPS[order])


def _canonical_read(m: re.Match, groups: tuple) -> tuple | str:
    """canonical_value's result from a match of a canonical value; `groups`: the desc's, the bbox array's, its bins'."""
    desc_group, box_group, bin_groups = groups
    desc = m.group(desc_group)
    if not desc.strip():
        return "missing_desc"
    return desc, list(map(int, m.group(*bin_groups))), m.span(box_group), m.span(desc_group)


def _general_value(text: str, mem: Member):
    """Any other value, JSON-loaded and scanned → (desc, bins, bbox array span, desc content span) or a drop
    reason."""
    try:
        value = json.loads(text[mem.value_start : mem.value_end], object_pairs_hook=_unique_pairs)
    except (ValueError, RecursionError):
        return "key_invalid"
    geom_keys = [k for k in value if k != "desc"]
    if len(geom_keys) > 1:
        return "key_invalid"
    desc = value.get("desc")
    if not isinstance(desc, str) or not desc.strip():
        return "missing_desc"
    if not geom_keys:
        return "missing_geom"
    if geom_keys[0] != "bbox_2d":
        return "poly_unsupported" if geom_keys[0] == "poly" else "unknown_geom"
    vals = value["bbox_2d"]
    if not isinstance(vals, list) or len(vals) != 4:
        return "wrong_arity"
    bins = [parse_coord_token(v) if isinstance(v, str) else None for v in vals]
    fields = fields_of(text, mem)
    if None in bins or fields is None or '"bbox_2d"' not in fields or '"desc"' not in fields:
        return "non_coord_token" if None in bins else "key_invalid"
    arr, dsc = fields['"bbox_2d"'], fields['"desc"']
    return desc, bins, (arr.value_start, arr.value_end), (dsc.value_start + 1, dsc.value_end - 1)


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out
