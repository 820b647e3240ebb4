"""YAML reading for profiles: safe load, YAML 1.2 scalars, positions, duplicate keys as errors.

Owns the loader class and the walk that turns a node tree into plain data plus a position map
(`key path tuple → Location`). Imports only PyYAML and stdlib.

Two known PyYAML warts are fixed here (PyYAML implements YAML 1.1):
- floats: YAML 1.1 needs a dot, so `1e-5` would load as the *string* "1e-5". We resolve floats with
  the YAML 1.2 core-schema pattern (`1e-5`, `2E3`, `1.5e-4`, `.5`, `.inf`, `.nan`);
- booleans: YAML 1.1 reads `yes/no/on/off` as booleans, so `eval_strategy: no` would become `False`.
  Only `true/false` (any case form of the core schema) are booleans here; `no` stays the string "no".
  Likewise a bare `2024-01-01` stays a string (no implicit timestamps).
Integers follow the core schema too (`010` is ten, not octal eight; no `1:30` sexagesimal).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from toolkit.config.errors import Issue, Location

Path_t = tuple  # a key path: str keys and int list indices

_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_COLLECTION_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}

_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT_RE = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class StrictLoader(_BASE_LOADER):  # type: ignore[misc, valid-type]
    """Safe loader with YAML 1.2 core-schema booleans, integers and floats."""


StrictLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in entries if tag not in (_BOOL_TAG, _INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG)]
    for ch, entries in _BASE_LOADER.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver(_BOOL_TAG, _BOOL_RE, list("tTfF"))
StrictLoader.add_implicit_resolver(_INT_TAG, _INT_RE, list("-+0123456789"))
StrictLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


def _construct_bool(loader, node):
    return loader.construct_scalar(node).lower() == "true"


def _construct_int(loader, node):
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)


def _construct_float(loader, node):
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text.endswith(".nan"):
        return math.nan
    return float(text)


StrictLoader.add_constructor(_BOOL_TAG, _construct_bool)
StrictLoader.add_constructor(_INT_TAG, _construct_int)
StrictLoader.add_constructor(_FLOAT_TAG, _construct_float)


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def render_path(path: Path_t) -> str:
    """`('a', 'servers', 0, 'x')` → `a.servers[0].x`; the empty path → `<document>`.

    A key that is not a plain name (spaces, dots, control characters, empty) is shown quoted,
    e.g. `training["my key"]`, so every path stays visible and unambiguous.
    """
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(str(part)):
            out += ("." if out else "") + str(part)
        else:
            out += f"[{json.dumps(str(part), ensure_ascii=True)}]"
    return out or "<document>"


@dataclass
class Document:
    """One YAML file (or the --set layer): plain data and where each key path came from."""

    file: str
    data: dict
    positions: dict = field(default_factory=dict)
    extends: Any = None  # the raw `extends` value, popped from data by the chain loader

    def where(self, path: Path_t) -> Location:
        """The location of `path`, else of its nearest ancestor that has one, else the file itself."""
        for n in range(len(path), -1, -1):
            loc = self.positions.get(tuple(path[:n]))
            if loc is not None:
                return loc
        return Location(self.file, 1, 1)


def _mark(file: str, node) -> Location:
    return Location(file, node.start_mark.line + 1, node.start_mark.column + 1)


class _Walker:
    """Turns a composed node tree into data + positions, collecting issues instead of raising."""

    def __init__(self, loader: StrictLoader, file: str):
        self.loader, self.file = loader, file
        self.positions: dict = {}
        self.issues: list[Issue] = []
        self._active: set[int] = set()  # nodes on the current walk: a recursive alias would never end

    def issue(self, node, path: Path_t, message: str, fix: str = "") -> None:
        self.issues.append(Issue.at(_mark(self.file, node), render_path(path), message, fix))

    def walk(self, node, path: Path_t) -> Any:
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _COLLECTION_TAGS:
            self.issue(
                node, path, f"YAML tag {node.tag!r} is not supported", "use plain YAML lists and mappings (no tags)"
            )
            return None
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            if id(node) in self._active:
                self.issue(node, path, "a YAML alias refers to itself", "write the value out")
                return None
            self._active.add(id(node))
            try:
                return (
                    self.walk_mapping(node, path) if isinstance(node, yaml.MappingNode) else self.walk_list(node, path)
                )
            finally:
                self._active.discard(id(node))
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.issue(
                node,
                path,
                f"cannot read this value: {getattr(exc, 'problem', exc)}",
                "use plain YAML scalars, lists and mappings (no tags)",
            )
            return None

    def walk_list(self, node, path: Path_t) -> list:
        out = []
        for i, item in enumerate(node.value):
            self.positions[path + (i,)] = _mark(self.file, item)
            out.append(self.walk(item, path + (i,)))
        return out

    def walk_mapping(self, node, path: Path_t) -> dict:
        out: dict = {}
        first_line: dict = {}
        for knode, vnode in node.value:
            if knode.tag == _MERGE_TAG:
                self.issue(
                    knode, path, "YAML merge keys (<<) are not supported", "use `extends:` or write the keys out"
                )
                continue
            if not isinstance(knode, yaml.ScalarNode):
                kind = "list" if isinstance(knode, yaml.SequenceNode) else "mapping"
                self.issue(
                    knode, path + (f"<{kind} key>",), f"keys must be strings, got a {kind}", "use a plain string key"
                )
                continue
            key = self.walk(knode, path)
            if not isinstance(key, str):
                self.issue(
                    knode,
                    path + (str(key),),
                    f"keys must be strings, got {type_name(key)} {key!r}",
                    "quote the key or rename it",
                )
                continue
            if key in out:
                self.issue(
                    knode,
                    path + (key,),
                    f"duplicate key '{key}' (first defined at line {first_line[key]})",
                    "keep one of the two entries",
                )
            first_line.setdefault(key, knode.start_mark.line + 1)
            self.positions[path + (key,)] = _mark(self.file, knode)
            out[key] = self.walk(vnode, path + (key,))
        return out


# Limits on what one YAML text may expand to. A profile holds a few hundred values and nests about six
# levels deep; anchors and aliases repeat a value at every use, so 400 bytes of nested aliases can stand
# for billions of values (an "alias bomb"). The size is counted on the node graph, before anything is
# expanded, so an over-budget file is refused at once.
MAX_NODES = 10_000
MAX_NESTING = 64


def load_document(path: Path) -> tuple[Document | None, list[Issue]]:
    """Read one YAML file. Returns (None, issues) when it cannot be parsed or is not a mapping."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        return None, [
            Issue.at(Location(file), "<document>", f"cannot read file: {exc.strerror or exc}", "check the path")
        ]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [_not_utf8(file, raw, exc)]
    return parse_document(text, file)


def _not_utf8(file: str, raw: bytes, exc: UnicodeDecodeError) -> Issue:
    """The first byte that is not UTF-8, as a line and column."""
    before = raw[: exc.start]
    line, col = before.count(b"\n") + 1, exc.start - (before.rfind(b"\n") + 1) + 1
    return Issue.at(
        Location(file, line, col),
        "<document>",
        f"not UTF-8 text: byte 0x{raw[exc.start]:02x} cannot be decoded",
        "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
    )


def _compose(text: str, file: str):
    """(root node or None, issues): the node graph of one YAML document, within the size limits."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
        return (
            loader,
            None,
            [
                Issue.at(
                    loc,
                    "<document>",
                    f"YAML syntax error: {exc.problem or exc}",
                    "fix the YAML syntax at this position",
                )
            ],
        )
    except yaml.YAMLError as exc:
        return loader, None, [Issue.at(Location(file), "<document>", f"YAML error: {exc}", "fix the YAML syntax")]
    finally:
        loader.dispose()
    if node is not None:
        try:
            _measure(node, 1, {}, set())
        except _OverLimit as over:
            return loader, None, [Issue.at(_mark(file, over.node), "<document>", over.message, over.fix)]
    return loader, node, []


class _OverLimit(Exception):
    def __init__(self, node, message: str, fix: str):
        super().__init__(message)
        self.node, self.message, self.fix = node, message, fix


def _measure(node, depth: int, memo: dict, active: set) -> tuple[int, int]:
    """(values the node expands to, its nesting height), each shared node counted once per use but
    measured once (memo). Raises _OverLimit at the first node over MAX_NODES or MAX_NESTING."""
    if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        return 1, 1
    if id(node) in memo:
        size, height = memo[id(node)]
    elif id(node) in active:
        return 1, 1  # an alias to its own ancestor: the walker reports it
    else:
        active.add(id(node))
        children = [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else node.value
        size, height = 1, 1
        for child in children:
            if depth + 1 > MAX_NESTING:
                raise _OverLimit(
                    child,
                    f"values nest deeper than {MAX_NESTING} levels",
                    "flatten the value (a profile nests about six levels)",
                )
            child_size, child_height = _measure(child, depth + 1, memo, active)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_NODES:
                raise _OverLimit(
                    node,
                    f"this value expands to more than {MAX_NODES:,} values (YAML aliases "
                    "repeat their anchor's value at every use)",
                    "write the values out without nested aliases (a profile holds a few hundred)",
                )
        active.discard(id(node))
        memo[id(node)] = size, height
    if depth + height - 1 > MAX_NESTING:
        raise _OverLimit(
            node,
            f"values nest deeper than {MAX_NESTING} levels",
            "flatten the value (a profile nests about six levels)",
        )
    return size, height


def parse_document(text: str, file: str) -> tuple[Document | None, list[Issue]]:
    """Parse YAML text that must hold one mapping (an empty document counts as `{}`)."""
    loader, node, issues = _compose(text, file)
    if issues:
        return None, issues
    if node is None:
        return Document(file, {}), []
    walker = _Walker(loader, file)
    data = walker.walk(node, ())
    if not isinstance(data, dict):
        return None, walker.issues + [
            Issue.at(
                _mark(file, node),
                "<document>",
                f"a profile must be a mapping of sections, got {type_name(data)}",
                "start the file with `extends:` or a section such as `training:`",
            )
        ]
    return Document(file, data, walker.positions), walker.issues


def parse_value(text: str, source: str = "--set") -> Any:
    """Parse a `--set` value with the same YAML rules and limits as profiles (no tags, no merge keys,
    no self-referring or exploding aliases); raises ValueError naming the first problem."""
    if text.strip() == "":
        return ""
    loader, node, issues = _compose(text, source)
    if node is None and not issues:
        return None
    if not issues:
        walker = _Walker(loader, source)
        value = walker.walk(node, ())
        issues = walker.issues
    if issues:
        first = issues[0]
        raise ValueError(
            first.message if first.message.startswith("YAML") else f"not a usable YAML value: {first.message}"
        )
    return value


def type_name(value: Any) -> str:
    """A user-facing type name: mapping, list, str, int, float, bool, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def dump_yaml(data: Any) -> str:
    """Block-style YAML, keys in insertion order."""
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(data, Dumper=dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
