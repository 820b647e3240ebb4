"""The schema pass: run the strict voluptuous schema and turn every `Invalid` into an Issue.

Walks `MultipleInvalid.errors` (never `str(MultipleInvalid)`, which shows only the first), rewrites
voluptuous' stock texts as plain sentences with a did-you-mean (difflib) and a fix. Imports
voluptuous and stdlib only.
"""

from __future__ import annotations

from typing import Any

from voluptuous import Invalid, MultipleInvalid, Schema

from toolkit.config.atoms import closest, received
from toolkit.config.errors import OVERRIDE_SOURCE, Issue, Location
from toolkit.config.spec import ItemList, Key, Section, key_index, node_at
from toolkit.config.yamlio import Document, render_path

_EXTRA = "extra keys not allowed"
_REQUIRED = "required key not provided"


def value_at(data: Any, path: tuple) -> Any:
    """The raw value at a key path, or None when the path does not exist."""
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _spec_text(node: Any) -> str:
    if isinstance(node, Key):
        return f"{node.atom.describe()}: {node.doc}"
    if isinstance(node, (Section, ItemList)):
        return f"a mapping: {node.doc}" if isinstance(node, Section) else f"a list: {node.doc}"
    return ""


def _unknown_key(root: Section, index: dict, doc: Document, path: tuple) -> Issue:
    key, parent = path[-1], path[:-1]
    parent_node = node_at(root, parent)
    allowed = list(parent_node.keys) if isinstance(parent_node, Section) else []
    if isinstance(parent_node, ItemList):
        allowed = list(parent_node.item.keys)
    guess = closest(key, allowed)
    elsewhere = [p for p in index.get(str(key), []) if p != render_path(path)]
    where = render_path(parent) if parent else "the top level"
    if elsewhere:  # the exact name lives in another section: a misplaced key beats a near-miss spelling
        message, fix = f"unknown key '{key}' at {where}; did you mean {elsewhere[0]}?", f"move it to {elsewhere[0]}"
    elif guess:
        message, fix = f"unknown key '{key}'; did you mean '{guess}'?", f"rename it to {guess}"
    else:
        shown = ", ".join(allowed[:12]) + (", ..." if len(allowed) > 12 else "")
        message, fix = f"unknown key '{key}' at {where}", f"remove it; keys allowed here: {shown or '(none)'}"
    return Issue.at(doc.where(path), render_path(path), message, fix)


def to_issue(root: Section, index: dict, doc: Document, err: Invalid) -> Issue:
    """One voluptuous error → one Issue with location, key path, plain message and fix."""
    path = tuple(err.path)
    text = err.error_message
    if text == _EXTRA and path:
        return _unknown_key(root, index, doc, path)
    node = node_at(root, path)
    if node is None and path and isinstance(path[-1], int):
        node = node_at(root, path[:-1])  # an item of a list-valued key
    if text == _REQUIRED:
        return Issue.at(
            _required_at(doc, path),
            render_path(path),
            "required key is missing",
            f"set {render_path(path)} ({_spec_text(node)})",
        )
    if text in ("expected a dictionary", "expected a list"):
        text = f"{text.replace('dictionary', 'mapping')}, got {received(value_at(doc.data, path))}"
    return Issue.at(doc.where(path), render_path(path), text, _fix_for(text, path, value_at(doc.data, path)))


def _required_at(doc: Document, path: tuple) -> Location:
    """Where a missing key is reported: in the file being loaded (`doc.file`), never in a parent that merely
    holds its section (a parent is a base, not a complete profile). The nearest ancestor section that file
    (or --set) wrote, else its `extends:` line, else its first line."""
    for n in range(len(path), -1, -1):
        loc = doc.positions.get(tuple(path[:n]))
        if loc is not None and loc.file in (doc.file, OVERRIDE_SOURCE):
            return loc
    return doc.positions.get(("extends",)) or Location(doc.file, 1, 1)


def _fix_for(text: str, path: tuple, raw: Any) -> str:
    """A concrete next step for a value error."""
    if "did you mean '" in text:
        return "use '" + text.split("did you mean '", 1)[1].split("'", 1)[0] + "'"
    if "available: " in text:
        return "use one of: " + text.split("available: ", 1)[1]
    if isinstance(raw, str) and ("int" in text or "float" in text):
        try:
            number = float(raw)
        except ValueError:
            number = None
        if number is not None:
            return f"write {raw} without quotes so it is a number"
    return f"see {doc_key(path)} in docs/CONFIG_REFERENCE.md"


def doc_key(path: tuple) -> str:
    """The reference-doc name of a key path: list indices become `[]` (servers[0].x → servers[].x)."""
    out = ""
    for part in path:
        out += "[]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def order_like_spec(data: Any, node: Any) -> Any:
    """Mappings re-ordered as the schema declares them (stable, readable `stage2 config` output)."""
    if isinstance(node, Section) and isinstance(data, dict):
        known = [k for k in node.keys if k in data] + [k for k in data if k not in node.keys]
        return {k: order_like_spec(data[k], node.keys.get(k)) for k in known}
    if isinstance(node, ItemList) and isinstance(data, list):
        return [order_like_spec(item, node.item) for item in data]
    return data


def validate_schema(
    doc: Document, schema: Schema, root: Section, index: dict | None = None
) -> tuple[dict | None, list[Issue]]:
    """Validate `doc.data`: (typed data with defaults, in schema order; []) or (None, every issue).
    `index` is `key_index(root)` when the caller has it precomputed."""
    try:
        return order_like_spec(schema(doc.data), root), []
    except MultipleInvalid as exc:
        index = index if index is not None else key_index(root)
        return None, [to_issue(root, index, doc, e) for e in exc.errors]
    except Invalid as exc:  # defensive: a top-level Invalid without MultipleInvalid
        return None, [to_issue(root, index if index is not None else key_index(root), doc, exc)]
