"""Canonical text forms: the system/user prompt and the assistant answer JSON.

The answer is one JSON object `{"object_1": {"desc": "cat", "bbox_2d": ["<|coord_12|>", …]}, …}` with
separators ", " and ": ". Objects are numbered from 1 in canonical order (sorted by (y1, x1, x2, y2, desc)
or the record's order); the field order is desc_first or geometry_first. Imports nothing heavy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from toolkit.data.coords import coord_token

FIELD_ORDERS = ("desc_first", "geometry_first")
OBJECT_ORDERINGS = ("sorted", "given")
SEPARATORS = (", ", ": ")

SYSTEM_PROMPT = (
    "You are a detector. List every object of the scene as one JSON object whose keys are object_1, "
    "object_2, ... in reading order (top to bottom, then left to right). Each value has a desc and a "
    "bbox_2d of four coordinate tokens x1, y1, x2, y2."
)
USER_INSTRUCTION = "detect all objects."


def object_payload(desc: str, bbox: Sequence[int], field_order: str = "desc_first") -> dict:
    """One object's value dict with coordinate tokens, in the requested field order."""
    if field_order not in FIELD_ORDERS:
        raise ValueError(f"object_field_order must be one of {FIELD_ORDERS}, got {field_order!r}")
    geom = [coord_token(int(v)) for v in bbox]
    if field_order == "desc_first":
        return {"desc": desc, "bbox_2d": geom}
    return {"bbox_2d": geom, "desc": desc}


def canonical_order(objects: Iterable[Mapping], ordering: str = "sorted") -> list[Mapping]:
    """Objects in the order the answer lists them."""
    objs = list(objects)
    if ordering == "given":
        return objs
    if ordering != "sorted":
        raise ValueError(f"object_ordering must be one of {OBJECT_ORDERINGS}, got {ordering!r}")
    return sorted(objs, key=lambda o: (o["bbox_2d"][1], o["bbox_2d"][0], o["bbox_2d"][2], o["bbox_2d"][3], o["desc"]))


def dumps_payload(payload: Mapping) -> str:
    """json.dumps with the canonical separators."""
    return json.dumps(payload, separators=SEPARATORS, ensure_ascii=False)


def render_answer(objects: Iterable[Mapping], field_order: str = "desc_first", ordering: str = "sorted") -> str:
    """The full canonical answer text (without the end-of-turn token)."""
    ordered = canonical_order(objects, ordering)
    body = {f"object_{i}": object_payload(o["desc"], o["bbox_2d"], field_order) for i, o in enumerate(ordered, 1)}
    return dumps_payload(body)


def render_entries(objects: Sequence[Mapping], start_index: int, field_order: str = "desc_first") -> str:
    """`"object_n": {...}, "object_n+1": {...}` for an FN-append fragment (no braces, no leading comma)."""
    entries = {
        f"object_{start_index + i}": object_payload(o["desc"], o["bbox_2d"], field_order) for i, o in enumerate(objects)
    }
    return dumps_payload(entries)[1:-1]  # one dumps for all: the separators put ", " between the entries


def render_messages(scene: str, system: str = SYSTEM_PROMPT) -> list[dict]:
    """Chat messages for one text-scene record (the assistant turn is added by the caller when teacher forcing)."""
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"{USER_INSTRUCTION} scene: {scene}"},
    ]
