"""The schema DSL: Key, Section, ItemList, and their compilation to one strict voluptuous Schema.

A spec tree is plain data (every key with its atom, default and one-line description). From it we
build (a) the voluptuous schema, strict at every depth (PREVENT_EXTRA), defaults filled by
`Optional(default=...)`; (b) a partial variant for base files (no required keys, no defaults);
(c) lookups for did-you-mean and docs. Imports voluptuous and stdlib only.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from voluptuous import PREVENT_EXTRA, All, Invalid, MultipleInvalid, Optional, Required, Schema

from toolkit.config.atoms import Atom, received


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Key:
    """A leaf key: its atom, its default (REQUIRED when none) and a one-line description."""

    atom: Atom
    doc: str
    default: Any = REQUIRED


@dataclass(frozen=True)
class Section:
    """A mapping of keys. Optional sections default to `{}` so their own defaults fill in."""

    doc: str
    keys: dict = field(default_factory=dict)
    required: bool = False


@dataclass(frozen=True)
class ItemList:
    """A list of mappings that share one item Section (e.g. vllm.server.servers)."""

    doc: str
    item: Section
    default: tuple = ()


def _factory(value: Any):
    return lambda: copy.deepcopy(value)


def _mapping_check(value: Any) -> Any:
    if not isinstance(value, dict):
        raise Invalid(f"expected a mapping, got {received(value)}")
    return value


def _list_check(value: Any) -> Any:
    if not isinstance(value, list):
        raise Invalid(f"expected a list of mappings, got {received(value)}")
    return value


class _Items:
    """Validates a list of mappings item by item, collecting every item's errors.

    (voluptuous' own `[schema]` stops at the first item whose error is nested deeper than the item.)
    """

    def __init__(self, item: Section, partial: bool):
        self.schema = Schema(All(_mapping_check, _compile(item, partial)), extra=PREVENT_EXTRA, required=False)

    def __call__(self, value: Any) -> list:
        _list_check(value)
        out, errors = [], []
        for i, item in enumerate(value):
            try:
                out.append(self.schema(item))
            except MultipleInvalid as exc:
                errors.extend(Invalid(e.error_message, path=[i] + list(e.path)) for e in exc.errors)
            except Invalid as exc:
                errors.append(Invalid(exc.error_message, path=[i] + list(exc.path)))
        if errors:
            raise MultipleInvalid(errors)
        return out


def _compile(section: Section, partial: bool) -> dict:
    out: dict = {}
    for name, spec in section.keys.items():
        if isinstance(spec, Section):
            marker = Optional(name) if partial else (Required(name) if spec.required else Optional(name, default=dict))
            out[marker] = All(_mapping_check, _compile(spec, partial))
        elif isinstance(spec, ItemList):
            marker = Optional(name) if partial else Optional(name, default=_factory(list(spec.default)))
            out[marker] = _Items(spec.item, partial)
        else:
            if partial:
                marker = Optional(name)
            elif spec.default is REQUIRED:
                marker = Required(name)
            else:
                marker = Optional(name, default=_factory(spec.default))
            out[marker] = spec.atom
    return out


def build_schema(root: Section, partial: bool = False) -> Schema:
    """The strict voluptuous Schema of a spec tree (partial: every key optional, no defaults)."""
    return Schema(_compile(root, partial), extra=PREVENT_EXTRA, required=False)


def node_at(root: Section, path: tuple) -> Any:
    """The spec node (Section, ItemList or Key) at a key path; list indices step into ItemList items."""
    node: Any = root
    for part in path:
        if isinstance(node, ItemList) and isinstance(part, int):
            node = node.item
            continue
        if not isinstance(node, Section) or part not in node.keys:
            return None
        node = node.keys[part]
    return node


def walk_spec(section: Section, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, node) for every node, depth first, in declaration order."""
    for name, spec in section.keys.items():
        path = prefix + (name,)
        yield path, spec
        if isinstance(spec, Section):
            yield from walk_spec(spec, path)
        elif isinstance(spec, ItemList):
            yield from walk_spec(spec.item, path + ("[]",))


def key_index(root: Section) -> dict[str, list[str]]:
    """Key name → every dotted path where that name is defined (for 'did you mean <other path>')."""
    index: dict[str, list[str]] = {}
    for path, _ in walk_spec(root):
        index.setdefault(path[-1], []).append(".".join(path).replace(".[]", "[]"))
    return index
