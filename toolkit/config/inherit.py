"""`extends`: load a profile and its ancestors, then deep-merge them (mappings merge; lists and
scalars replace). Cycles, missing parents and anything but one relative path are errors.

Imports stdlib only (plus our YAML reader).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from toolkit.config.errors import Issue, Location
from toolkit.config.yamlio import Document, load_document

MAX_DEPTH = 8


def load_chain(path: Path) -> tuple[list[Document], list[Issue], bool]:
    """Documents from the root ancestor to `path`, every issue met, and whether the chain is complete."""
    chain: list[Document] = []
    issues: list[Issue] = []
    seen: list[Path] = []
    current, via = Path(path).resolve(), None  # via: where the `extends` that led here was written
    while True:
        if current in seen:
            cycle = " → ".join(p.name for p in seen + [current])
            issues.append(Issue.at(via, "extends", f"cycle in extends: {cycle}", "remove one of the extends links"))
            return chain, issues, False
        if len(seen) >= MAX_DEPTH:
            issues.append(
                Issue.at(
                    via,
                    "extends",
                    f"extends chain deeper than {MAX_DEPTH} files",
                    "flatten the chain (leaf → stage2 base → base)",
                )
            )
            return chain, issues, False
        if not current.is_file():
            where = via or Location(str(current))
            issues.append(
                Issue.at(
                    where,
                    "extends",
                    f"parent file not found: {current}",
                    "fix the relative path (it is relative to the file that extends)",
                )
            )
            return chain, issues, False
        doc, doc_issues = load_document(current)
        issues.extend(doc_issues)
        if doc is None:
            return chain, issues, False
        seen.append(current)
        chain.insert(0, doc)
        doc.extends = doc.data.pop("extends", None)
        if doc.extends is None:
            return chain, issues, True
        via = doc.where(("extends",))
        if not isinstance(doc.extends, str) or not doc.extends.strip():
            shown = f"a list of {len(doc.extends)}" if isinstance(doc.extends, list) else repr(doc.extends)
            issues.append(
                Issue.at(
                    via,
                    "extends",
                    f"extends takes exactly one relative path (a string), got {shown}",
                    "write `extends: ../base.yaml` (one parent; no lists)",
                )
            )
            return chain, issues, False
        current = (current.parent / doc.extends).resolve()


def deep_merge(base: Any, over: Any) -> Any:
    """`over` on top of `base`: mappings merge key by key, everything else is replaced (deep copies)."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for key, value in over.items():
            out[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


def iter_paths(value: Any, prefix: tuple = ()):
    """`prefix` and every key path below it (mapping keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from iter_paths(sub, prefix + (key,))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield from iter_paths(sub, prefix + (i,))


def merge_documents(docs: list[Document], file: str | None = None) -> Document:
    """Merge documents in order (later wins); each key keeps the position of the file that set it."""
    if not docs:
        return Document(file or "<none>", {})
    data: dict = {}
    positions: dict = {}
    for doc in docs:
        data = deep_merge(data, doc.data)
        merged = {}
        for path in iter_paths(data):
            loc = doc.positions.get(path) or positions.get(path)
            if path and loc is not None:
                merged[path] = loc
        positions = merged
    if ("extends",) in docs[-1].positions:  # where the loaded file names its parent (validate blames it there)
        positions[("extends",)] = docs[-1].positions[("extends",)]
    return Document(file or docs[-1].file, data, positions)
