"""The JSON member scanner of a rollout's text: `scan_object` walks one `{...}` object member by member,
`continue_scan` resumes a scan on text appended to its end, `fields_of` lists an object value's members.

Used by parse.py (the rollout's objects) and targets.py (append-readiness and closure of a target). Strings,
nesting and whitespace follow JSON; the fast paths below match the flat values a detector writes in one go,
and the bracket matching of `_value_end` decides everything else. Pure Python; imports nothing heavy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

JSON_WS = " \t\n\r"
_WS_RE = re.compile(r"[ \t\n\r]*")
_STR_TAIL_RE = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # after an opening quote, through the closing one
_NESTED_RE = re.compile(r'["{}\[\]]')
_SCALAR_RE = re.compile(r'[^ \t\n\r,{}\[\]":]+')
_CLOSER = {"{": "}", "[": "]"}
# Fast paths (possessive, so no backtracking): a container whose only nesting is arrays of strings or scalars
# inside an object — every object value a detector writes — matched in one go; `_value_end`'s bracket
# matching decides the rest (nested deeper, unclosed, mismatched). Strings as in _STR_TAIL_RE.
_STR = r'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_FLAT_ARRAY = r'\[(?:[^"{}\[\]]++|' + _STR + r")*+\]"
_FLAT_RE = {
    "[": re.compile(_FLAT_ARRAY, re.S),
    "{": re.compile(r'\{(?:[^"{}\[\]]++|' + _STR + "|" + _FLAT_ARRAY + r")*+\}", re.S),
}
_MEMBER_HEAD_RE = re.compile("(" + _STR + r")[ \t\n\r]*+:[ \t\n\r]*+", re.S)  # "key" : (up to the value)
_NEXT_HEAD_RE = re.compile(r",[ \t\n\r]*+" + _MEMBER_HEAD_RE.pattern, re.S)  # , "key" : (up to the value)
# A whole member whose value is a flat object (a detector's every entry), head and value in one match: the
# same member and state as the head, then the value, one by one (every part is possessive, so the one match
# succeeds exactly when the two would).
_FLAT_MEMBER_RE = re.compile(_MEMBER_HEAD_RE.pattern + "(" + _FLAT_RE["{"].pattern + ")", re.S)
_NEXT_FLAT_MEMBER_RE = re.compile(_NEXT_HEAD_RE.pattern + "(" + _FLAT_RE["{"].pattern + ")", re.S)


@dataclass
class Member:
    """One `"key": value` entry of a scanned object; spans are [start, end) character offsets."""

    key_raw: str  # the key with its quotes, exactly as written
    key_start: int
    value_start: int = -1
    value_end: int = -1  # -1 while the value is incomplete
    kind: str = ""  # "object" | "array" | "string" | "scalar"


@dataclass
class ObjectScan:
    """Result of scanning one `{...}` object member by member.

    status: "closed" (its `}` found, `end` is just after it), "open" (text ended; `state` says where),
            "error" (a syntax error at member level at `end`).
    state:  where an open scan stopped: "key_or_close" (just after `{`), "key" (after `,`), "in_key",
            "colon", "value", "in_value", "after" (after a complete value).
    """

    start: int
    members: list[Member] = field(default_factory=list)
    status: str = "open"
    end: int = 0
    state: str = "key_or_close"


def _value_end(text: str, i: int) -> tuple[str, int, str]:
    """(status, end, kind) of the JSON value starting at text[i] (not whitespace)."""
    c = text[i]
    if c == '"':
        m = _STR_TAIL_RE.match(text, i + 1)
        return ("ok", m.end(), "string") if m else ("open", len(text), "string")
    if c in _CLOSER:
        flat = _FLAT_RE[c].match(text, i)
        if flat is not None:
            return "ok", flat.end(), "object" if c == "{" else "array"
        stack, j = [c], i + 1
        while True:
            m = _NESTED_RE.search(text, j)
            if m is None:
                return "open", len(text), ""
            ch, p = m.group(), m.start()
            if ch == '"':
                s = _STR_TAIL_RE.match(text, p + 1)
                if s is None:
                    return "open", len(text), ""
                j = s.end()
            elif ch in _CLOSER:
                stack.append(ch)
                j = p + 1
            elif ch != _CLOSER[stack.pop()]:
                return "error", p, ""
            elif not stack:
                return "ok", p + 1, "object" if c == "{" else "array"
            else:
                j = p + 1
    m = _SCALAR_RE.match(text, i)
    if m is None:
        return "error", i, ""
    return ("open", len(text), "scalar") if m.end() == len(text) else ("ok", m.end(), "scalar")


def scan_object(text: str, start: int) -> ObjectScan:
    """Scan the object opening at text[start] == "{": members strictly, values by bracket matching. Strings (with
    escapes) are skipped whole, so braces, brackets and `<|im_end|>` inside them are text. Inside a member value
    only bracket matching is checked; the value's own JSON is validated later."""
    return _scan_members(text, ObjectScan(start), start + 1)


def continue_scan(text: str, scan: ObjectScan) -> ObjectScan:
    """`scan_object(text, scan.start)` for a `text` extending the text of `scan`, open at member level (no key or
    value in progress; else ValueError): only the new text is scanned, `scan` is left unchanged."""
    if scan.status != "open" or scan.state not in ("key_or_close", "key", "after"):
        raise ValueError(f"only a scan open at member level continues; got status={scan.status}, state={scan.state}")
    return _scan_members(text, ObjectScan(scan.start, list(scan.members), state=scan.state), scan.end)


def _scan_members(text: str, scan: ObjectScan, i: int) -> ObjectScan:
    """Scan members from text[i] on, in `scan.state`; the scanner's loop (what `scan_object` documents)."""
    n = len(text)
    while True:
        i = _WS_RE.match(text, i).end()
        if i >= n:
            scan.end = n
            return scan
        c, state = text[i], scan.state
        if c == "}" and state in ("key_or_close", "after"):
            scan.status, scan.end = "closed", i + 1
            return scan
        if state == "after" and c == "," and (whole := _NEXT_FLAT_MEMBER_RE.match(text, i)):
            scan.members.append(Member(whole.group(1), whole.start(1), whole.start(2), whole.end(), "object"))
            i = whole.end()  # still "after"
        elif state in ("key_or_close", "key") and c == '"' and (whole := _FLAT_MEMBER_RE.match(text, i)):
            scan.members.append(Member(whole.group(1), i, whole.start(2), whole.end(), "object"))
            scan.state, i = "after", whole.end()
        elif state == "after" and c == "," and (head := _NEXT_HEAD_RE.match(text, i)):
            # `, "key": ` of the next member in one match (the same states as one by one)
            scan.members.append(Member(head.group(1), head.start(1)))
            scan.state, i = "value", head.end()
        elif state == "after" and c == ",":
            scan.state, i = "key", i + 1
        elif state in ("key_or_close", "key") and c == '"' and (head := _MEMBER_HEAD_RE.match(text, i)):
            # key, colon and the whitespace before the value in one match (the same states as one by one)
            scan.members.append(Member(head.group(1), i))
            scan.state, i = "value", head.end()
        elif state in ("key_or_close", "key") and c == '"':
            m = _STR_TAIL_RE.match(text, i + 1)
            if m is None:
                scan.state, scan.end = "in_key", n
                return scan
            scan.members.append(Member(text[i : m.end()], i))
            scan.state, i = "colon", m.end()
        elif state == "colon" and c == ":":
            scan.state, i = "value", i + 1
        elif state == "value":
            status, end, kind = _value_end(text, i)
            if status != "ok":
                scan.status = "error" if status == "error" else "open"
                scan.state, scan.end = "in_value", end
                return scan
            mem = scan.members[-1]
            mem.value_start, mem.value_end, mem.kind = i, end, kind
            scan.state, i = "after", end
        else:
            scan.status, scan.end = "error", i
            return scan


def fields_of(text: str, mem: Member) -> dict[str, Member] | None:
    """The members of a complete object value, by raw key text (None if any raw key repeats)."""
    inner = scan_object(text, mem.value_start)
    out = {f.key_raw: f for f in inner.members}
    return out if len(out) == len(inner.members) else None
