"""Validator atoms: small, strict, self-describing value checks used by the schema.

Every atom is a callable for voluptuous (returns the value or raises `Invalid`), and knows how to
describe itself (`type_text`, `constraint`) so docs/CONFIG_REFERENCE.md is generated from the same
objects that validate. No coercion: a quoted "1e-5" is a str and fails where a float is expected;
only int → float widening is allowed (YAML `1` for a float key). Imports voluptuous and stdlib only.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

from voluptuous import Invalid, MultipleInvalid

from toolkit.config.yamlio import type_name


def received(value: Any) -> str:
    """`str '1e-5'`, `int 3`, `null`: what the user wrote, cut to 80 chars."""
    if value is None:
        return "null"
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{type_name(value)} {text}"


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def closest(word: str, choices: Sequence[str]) -> str | None:
    """The closest choice by difflib ratio (≥ 0.6), or None."""
    found = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return found[0] if found else None


class Atom:
    """Base: subclasses set type_text and constraint, and implement check(value) -> value."""

    type_text = "any"
    constraint = ""

    def describe(self) -> str:
        return f"{self.type_text} {self.constraint}".strip()

    def fail(self, value: Any, hint: str = "") -> Invalid:
        msg = f"expected {self.describe()}, got {received(value)}"
        if isinstance(value, str) and self.type_text in ("int", "float"):
            hint = hint or "numbers are written without quotes"
        return Invalid(f"{msg}; {hint}" if hint else msg)

    def check(self, value: Any) -> Any:
        raise NotImplementedError

    def __call__(self, value: Any) -> Any:
        return self.check(value)

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


class Bool(Atom):
    type_text = "bool"
    constraint = "(true|false)"

    def check(self, value):
        if not isinstance(value, bool):
            raise self.fail(value)
        return value


def _range_text(lo, hi, lo_open, hi_open) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '≥'} {_fmt(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '≤'} {_fmt(hi)}"
    return ""


class Int(Atom):
    """An int (never a bool) in a closed range; `also` lists extra allowed sentinels such as -1."""

    type_text = "int"

    def __init__(self, lo: int | None = None, hi: int | None = None, also: Sequence[int] = ()):
        self.lo, self.hi, self.also = lo, hi, tuple(also)
        rng = _range_text(lo, hi, False, False)
        self.constraint = " or ".join([str(a) for a in self.also] + ([rng] if rng else []))

    def check(self, value):
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(value)
        if value in self.also:
            return value
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise self.fail(value)
        return value


class Float(Atom):
    """A finite number (int or float, never bool or str), returned as float."""

    type_text = "float"

    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.constraint = _range_text(lo, hi, lo_open, hi_open)

    def check(self, value):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self.fail(value)
        v = float(value)
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            raise self.fail(value)
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            raise self.fail(value)
        return v


class Str(Atom):
    type_text = "str"
    constraint = "(non-empty)"

    def check(self, value):
        if not isinstance(value, str) or not value.strip():
            raise self.fail(value)
        return value


class Enum(Atom):
    """One of fixed strings; a near miss gets a did-you-mean."""

    type_text = "str"

    def __init__(self, *choices: str):
        self.choices = tuple(choices)
        self.constraint = "one of " + "|".join(self.choices)

    def check(self, value):
        if isinstance(value, str) and value in self.choices:
            return value
        guess = closest(value, self.choices) if isinstance(value, str) else None
        raise self.fail(value, f"did you mean '{guess}'?" if guess else "")


class Nullable(Atom):
    """`inner` or null."""

    def __init__(self, inner: Atom, null_means: str = ""):
        self.inner, self.null_means = inner, null_means
        self.type_text = inner.type_text
        tail = f"or null ({null_means})" if null_means else "or null"
        self.constraint = f"{inner.constraint} {tail}".strip()

    def check(self, value):
        if value is None:
            return None
        try:
            return self.inner.check(value)
        except Invalid as exc:
            text = exc.error_message
            if "did you mean" in text or not text.startswith("expected"):
                raise  # keep the inner atom's specific hint (e.g. the list of available names)
            raise self.fail(value) from None


class NullMeans(Nullable):
    """Like Nullable, but null resolves to a fixed value (e.g. vllm.mode: null → colocate)."""

    def __init__(self, inner: Atom, value: Any):
        super().__init__(inner, f"→ {value}")
        self.value = value

    def check(self, value):
        return self.value if value is None else super().check(value)


class ListOf(Atom):
    """A list whose every item passes `inner`; all bad items are reported, each with its index."""

    def __init__(self, inner: Atom, nonempty: bool = False):
        self.inner, self.nonempty = inner, nonempty
        self.type_text = f"list[{inner.describe()}]"
        self.constraint = "(non-empty)" if nonempty else ""

    def check(self, value):
        if not isinstance(value, list) or (self.nonempty and not value):
            raise self.fail(value)
        out, errors = [], []
        for i, item in enumerate(value):
            try:
                out.append(self.inner.check(item))
            except Invalid as exc:
                errors.append(Invalid(exc.error_message, path=[i]))
        if errors:
            raise MultipleInvalid(errors)
        return out


class Either(Atom):
    """The first of several atoms that accepts the value (e.g. "all-linear" or a list of names)."""

    def __init__(self, *atoms: Atom):
        self.atoms = atoms
        self.type_text = " or ".join(a.describe() for a in atoms)

    def check(self, value):
        for atom in self.atoms:
            try:
                return atom.check(value)
            except Invalid:
                continue
        raise self.fail(value)


class Const(Atom):
    """Exactly one string value (used inside Either)."""

    def __init__(self, value: str):
        self.value = value
        self.type_text = f'"{value}"'

    def check(self, value):
        if value != self.value or not isinstance(value, str):
            raise self.fail(value)
        return value


class FreeMapping(Atom):
    """A mapping with any content (custom.extra, the only free-form bucket)."""

    type_text = "mapping"
    constraint = "(free-form)"

    def check(self, value):
        if not isinstance(value, dict):
            raise self.fail(value)
        return value


class OneOfFiles(Atom):
    """A name that must match one of the files a callable lists (e.g. DeepSpeed configs)."""

    type_text = "str"

    def __init__(self, list_names, what: str):
        self.list_names, self.what = list_names, what
        self.constraint = f"name of a {what}"

    def check(self, value):
        names = self.list_names()
        if isinstance(value, str) and value in names:
            return value
        if not isinstance(value, str):
            raise self.fail(value)
        guess = closest(value, names)
        hint = f"did you mean '{guess}'? " if guess else ""
        raise Invalid(f"unknown {self.what} '{value}'; {hint}available: {', '.join(names) or '(none)'}")


# Bounded numbers the schema sections share (toolkit/config/schema.py, schema_rollout.py).
POS_INT = Int(lo=1)
NONNEG_FLOAT = Float(lo=0.0)
POS_FLOAT = Float(lo=0.0, lo_open=True)
UNIT_FLOAT = Float(lo=0.0, hi=1.0)
