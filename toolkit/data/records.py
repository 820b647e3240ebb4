"""The text-record contract: one JSONL line per sample, and its strict loader.

A line is `{"id": "train-000001", "scene": "<text the model reads>", "objects": [{"desc": "cat",
"bbox_2d": [x1, y1, x2, y2]}, ...]}` with integer bins 0..999, x1 <= x2 and y1 <= y2 (docs/DATA.md).
The keys `images`, `width` and `height` are reserved for a later image variant and rejected for now.
`load_records` checks every line and raises one `RecordError` listing all problems as
`file:line: problem (fix: ...)`. Imports nothing heavy (no torch, no transformers).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from toolkit.data.coords import MAX_BIN

RECORD_KEYS = ("id", "scene", "objects")
OBJECT_KEYS = ("desc", "bbox_2d")
RESERVED_KEYS = ("images", "width", "height")
MAX_LISTED = 20


@dataclass(frozen=True)
class Record:
    """One validated sample. `objects` keep the file's order; each is {"desc": str, "bbox_2d": [4 ints]}."""

    id: str
    scene: str
    objects: tuple[dict, ...]

    def as_json(self) -> dict:
        """The JSONL form (key order id, scene, objects)."""
        return {"id": self.id, "scene": self.scene, "objects": [dict(o) for o in self.objects]}


@dataclass(frozen=True)
class RecordIssue:
    file: str
    line: int
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message} (fix: {self.fix})"


class RecordError(ValueError):
    """Every problem found in a records file, one `file:line: problem (fix: ...)` per line."""

    def __init__(self, issues: list[RecordIssue]):
        self.issues = list(issues)
        super().__init__(self._render())

    def _render(self) -> str:
        shown = [str(i) for i in self.issues[:MAX_LISTED]]
        more = len(self.issues) - len(shown)
        head = f"{len(self.issues)} problem(s) in records:"
        tail = [f"... and {more} more problem(s) not listed"] if more > 0 else []
        return "\n".join([head, *shown, *tail])


def _is_int(v) -> bool:
    # bool is an int subclass; a JSON `true` is never a coordinate.
    return isinstance(v, int) and not isinstance(v, bool)


def _check_bbox(bbox, where: str) -> list[tuple[str, str]]:
    if not isinstance(bbox, list) or len(bbox) != 4:
        return [(f"{where}.bbox_2d must be a list of 4 integers [x1, y1, x2, y2], got {bbox!r}",
                 "write four integer bins, e.g. [120, 40, 300, 210]")]
    bad = [v for v in bbox if not _is_int(v)]
    if bad:
        hint = " (floats are not bins)" if any(isinstance(v, float) and math.isfinite(v) for v in bad) else ""
        return [(f"{where}.bbox_2d values must be integers{hint}, got {bbox!r}",
                 f"quantize coordinates to integer bins 0..{MAX_BIN}")]
    problems = []
    out = [v for v in bbox if not 0 <= v <= MAX_BIN]
    if out:
        problems.append((f"{where}.bbox_2d has bins outside 0..{MAX_BIN}: {out}", f"clamp bins to 0..{MAX_BIN}"))
    x1, y1, x2, y2 = bbox
    if x1 > x2 or y1 > y2:
        problems.append((f"{where}.bbox_2d must have x1<=x2 and y1<=y2, got {bbox!r}",
                         "order the corners as [x1, y1, x2, y2] with the top-left first"))
    return problems


def _check_object(obj, k: int) -> list[tuple[str, str]]:
    where = f"objects[{k}]"
    if not isinstance(obj, dict):
        return [(f"{where} must be an object {{desc, bbox_2d}}, got {type(obj).__name__}",
                 'write {"desc": "cat", "bbox_2d": [x1, y1, x2, y2]}')]
    problems = []
    missing = [key for key in OBJECT_KEYS if key not in obj]
    if missing:
        problems.append((f"{where} is missing {', '.join(missing)}", "every object needs desc and bbox_2d"))
    extra = sorted(set(obj) - set(OBJECT_KEYS))
    if extra:
        problems.append((f"{where} has unknown keys {extra}", f"keep only {list(OBJECT_KEYS)}"))
    desc = obj.get("desc")
    if "desc" in obj and (not isinstance(desc, str) or not desc.strip()):
        problems.append((f"{where}.desc must be a non-empty string, got {desc!r}", "give the class name, e.g. \"cat\""))
    if "bbox_2d" in obj:
        problems.extend(_check_bbox(obj["bbox_2d"], where))
    return problems


def _check_line(data) -> list[tuple[str, str]]:
    if not isinstance(data, dict):
        return [(f"a record must be a JSON object, got {type(data).__name__}", 'write {"id": ..., "scene": ..., "objects": [...]}')]
    problems = []
    reserved = sorted(k for k in data if k in RESERVED_KEYS)
    if reserved:
        problems.append((f"keys {reserved} belong to the image variant, which is not supported yet",
                         "use text records (id, scene, objects) only"))
    extra = sorted(set(data) - set(RECORD_KEYS) - set(RESERVED_KEYS))
    if extra:
        problems.append((f"unknown keys {extra}", f"keep only {list(RECORD_KEYS)}"))
    missing = [k for k in RECORD_KEYS if k not in data]
    if missing:
        problems.append((f"missing required keys {missing}", f"every record needs {list(RECORD_KEYS)}"))
    if "id" in data and (not isinstance(data["id"], str) or not data["id"]):
        problems.append((f"id must be a non-empty string, got {data['id']!r}", 'use e.g. "train-000001"'))
    if "scene" in data and (not isinstance(data["scene"], str) or not data["scene"].strip()):
        problems.append((f"scene must be a non-empty string, got {data['scene']!r}", "describe the scene as text"))
    objects = data.get("objects")
    if "objects" in data and not isinstance(objects, list):
        problems.append((f"objects must be a list, got {type(objects).__name__}", "use [] for an empty scene"))
    elif isinstance(objects, list):
        for k, obj in enumerate(objects):
            problems.extend(_check_object(obj, k))
    return problems


def _strict_pairs(pairs):
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate keys {dupes}")
    return dict(pairs)


def parse_record_line(text: str) -> tuple[Record | None, list[tuple[str, str]]]:
    """Parse one JSONL line -> (Record or None, [(problem, fix), ...])."""
    try:
        data = json.loads(text, object_pairs_hook=_strict_pairs)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError; so are duplicate keys
        return None, [(f"not valid JSON: {exc}", "write one JSON object per line")]
    problems = _check_line(data)
    if problems:
        return None, problems
    objects = tuple({"desc": o["desc"], "bbox_2d": list(o["bbox_2d"])} for o in data["objects"])
    return Record(id=data["id"], scene=data["scene"], objects=objects), []


def load_records(path: str | Path, limit: int | None = None) -> list[Record]:
    """Load and validate a records JSONL file (blank lines are skipped).

    Args:
        path: the .jsonl file.
        limit: read at most this many non-blank lines (the rest are neither read nor checked).
    Raises:
        RecordError: listing every malformed line and duplicate id, as `file:line: problem (fix: ...)`.
        FileNotFoundError: if `path` does not exist.
    """
    path = Path(path)
    records: list[Record] = []
    issues: list[RecordIssue] = []
    first_line_of: dict[str, int] = {}
    seen = 0
    with path.open(encoding="utf-8") as fh:
        for lineno, text in enumerate(fh, 1):
            if not text.strip():
                continue
            if limit is not None and seen >= limit:
                break
            seen += 1
            rec, problems = parse_record_line(text)
            issues.extend(RecordIssue(str(path), lineno, msg, fix) for msg, fix in problems)
            if rec is None:
                continue
            if rec.id in first_line_of:
                issues.append(RecordIssue(str(path), lineno, f"duplicate id {rec.id!r} (first on line {first_line_of[rec.id]})",
                                          "give every record a unique id"))
                continue
            first_line_of[rec.id] = lineno
            records.append(rec)
    if issues:
        raise RecordError(issues)
    return records


def dump_records(records, path: str | Path) -> None:
    """Write records (Record or plain dicts) as JSONL, one compact line each, LF line ends."""
    with Path(path).open("w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            data = rec.as_json() if isinstance(rec, Record) else rec
            fh.write(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
