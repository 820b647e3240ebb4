"""`--set a.b[0].c=VALUE` overrides: parse (the value is YAML) and apply on top of the merged profile.

Overrides go through the same legacy/schema/rule pipeline as files; their location is `--set`.
Imports stdlib only (plus our YAML reader).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from toolkit.config.errors import OVERRIDE_SOURCE, Issue, Location
from toolkit.config.inherit import deep_merge, iter_paths
from toolkit.config.yamlio import Document, parse_value, render_path

_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")
OVERRIDE_LOCATION = Location(OVERRIDE_SOURCE)


def parse_override(text: str) -> tuple[tuple, Any]:
    """`a.b[0].c=VALUE` → (('a', 'b', 0, 'c'), parsed VALUE). Raises ValueError with a usage hint."""
    if "=" not in text:
        raise ValueError(f"{text!r} is not KEY=VALUE (e.g. training.learning_rate=1e-5)")
    key, value = text.split("=", 1)
    path: list = []
    for segment in key.strip().split("."):
        match = _SEGMENT.fullmatch(segment)
        if not match:
            raise ValueError(
                f"{key!r} is not a dotted key path (e.g. rollout_matching.vllm.server.servers[0].base_url)"
            )
        path.append(match.group(1))
        path.extend(int(i) for i in re.findall(r"\[(\d+)\]", match.group(2)))
    try:
        return tuple(path), parse_value(value)
    except ValueError as exc:
        raise BadValue(str(exc)) from None


class BadValue(ValueError):
    """The VALUE of KEY=VALUE is not usable YAML (the key path itself was fine)."""


def _set(doc: Document, path: tuple, value: Any) -> str | None:
    """Set one value; returns an error text when the path cannot exist."""
    node: Any = doc.data
    for depth, part in enumerate(path[:-1]):
        nxt = path[depth + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                return f"{render_path(path[: depth + 1])} does not exist (a list index beyond the list)"
            node = node[part]
            continue
        if not isinstance(node, dict):
            return f"{render_path(path[:depth])} is not a mapping"
        if part not in node or node[part] is None:
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            return f"{render_path(path)} does not exist (a list index beyond the list)"
        node[last] = value
    elif not isinstance(node, dict):
        return f"{render_path(path[:-1])} is not a mapping"
    else:
        node[last] = deep_merge(node[last], value) if isinstance(node.get(last), dict) else value
    for sub in iter_paths(value, path):
        doc.positions[sub] = OVERRIDE_LOCATION
    for depth in range(1, len(path)):
        doc.positions.setdefault(path[:depth], OVERRIDE_LOCATION)
    return None


def apply_overrides(doc: Document, overrides: Sequence[str]) -> list[Issue]:
    """Apply every override in order on `doc` (in place); returns issues for malformed ones."""
    issues = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ValueError as exc:
            fix = (
                "write VALUE as plain YAML (a number, a string, [a, list] or {a: mapping}); quote it to keep "
                "it a string"
                if isinstance(exc, BadValue)
                else "write --set KEY=VALUE with a dotted key path"
            )
            issues.append(Issue.at(OVERRIDE_LOCATION, text.split("=", 1)[0] or "<override>", str(exc), fix))
            continue
        problem = _set(doc, path, value)
        if problem:
            issues.append(Issue.at(OVERRIDE_LOCATION, render_path(path), problem, "check the key path"))
    return issues
