"""The record contract: one JSONL line per sample, and its strict loader (docs/DATA.md).

A text record is `{"id": "train-000001", "scene": "<text the model reads>", "objects": [{"desc": "cat",
"bbox_2d": [x1, y1, x2, y2]}, ...]}`; an image record is `{"id": ..., "images": ["images/000001.png"],
"width": 112, "height": 112, "objects": [...]}` (exactly one of `scene` / `images`). Boxes are integer bins
0..999 (bbox_format "norm1000") or pixels converted to bins on load ("pixel"); x1 <= x2 and y1 <= y2.
Image entries resolve against an image root (default: the JSONL's own directory, never the working
directory); the file must exist and its real size must equal width x height.
The predecessor system's raw files load as they are: `id` may be absent (derived from file and line),
`bbox_2d` values may be coord-token strings `"<|coord_N|>"`, `summary` / `metadata` are accepted (and
ignored), and `poly` objects follow `poly_policy` ("error", or "drop" counted per record).
`load_records` checks every line (the checks: toolkit/data/record_checks.py) and raises one `RecordError` listing
all problems as `file:line: problem (fix: ...)`. Imports nothing heavy (no torch, no transformers; PIL only for
image records).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.data.coords import pixel_to_bin
from toolkit.data.record_checks import as_bin, check_image_file, check_line

BBOX_FORMATS = ("norm1000", "pixel")
POLY_POLICIES = ("error", "drop")
MAX_LISTED = 20

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One validated sample. `objects` keep the file's order; each is {"desc": str, "bbox_2d": [4 bins]}.

    Text records have `scene` and no images. Image records have `scene == ""`, `images` = absolute paths
    (resolved on load), `image_entries` = the same entries as written in the file (what `as_json` writes
    back), and `width` / `height` in pixels. Boxes are always bins 0..999 here, whatever the file's format.
    """

    id: str
    scene: str
    objects: tuple[dict, ...]
    images: tuple[str, ...] = ()
    width: int | None = None
    height: int | None = None
    image_entries: tuple[str, ...] = ()
    # Where the record came from (error messages) and how many poly objects poly_policy "drop" removed.
    file: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)
    dropped_poly: int = field(default=0, compare=False)

    @property
    def is_image(self) -> bool:
        return bool(self.images)

    def as_json(self) -> dict:
        """The JSONL form: text (id, scene, objects) or image (id, images, width, height, objects).

        Image entries are written as the file had them (relative stays relative); boxes are written as bins,
        so a file loaded with bbox_format "pixel" dumps as a "norm1000" file.
        """
        objects = [dict(o) for o in self.objects]
        if not self.is_image:
            return {"id": self.id, "scene": self.scene, "objects": objects}
        return {
            "id": self.id,
            "images": list(self.image_entries or self.images),
            "width": self.width,
            "height": self.height,
            "objects": objects,
        }


@dataclass(frozen=True)
class RecordIssue:
    file: str
    line: int
    message: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file  # line 0: the file as a whole
        return f"{where}: {self.message} (fix: {self.fix})"


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


def _strict_pairs(pairs):
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate keys {dupes}")
    return dict(pairs)


def _to_bins(bbox: list, size: tuple[int, int] | None) -> list[int]:
    if size is None:
        return [as_bin(v) for v in bbox]
    w, h = size
    return [pixel_to_bin(bbox[0], w), pixel_to_bin(bbox[1], h), pixel_to_bin(bbox[2], w), pixel_to_bin(bbox[3], h)]


def resolve_image(entry: str, image_root: Path) -> str:
    """Absolute path of one `images` entry: absolute entries stay, relative ones join `image_root`."""
    path = Path(entry).expanduser()
    return os.path.normpath(path if path.is_absolute() else image_root / path)


def _parse_json(text: str) -> tuple[object, list[tuple[str, str]]]:
    try:
        return json.loads(text, object_pairs_hook=_strict_pairs), []
    except ValueError as exc:  # json.JSONDecodeError is a ValueError; so are duplicate keys
        return None, [(f"not valid JSON: {exc}", "write one JSON object per line")]
    except RecursionError:
        return None, [
            (
                "JSON nested too deeply to parse (over Python's recursion limit)",
                "a record is flat: {images, width, height, objects: [{desc, bbox_2d}]}",
            )
        ]


def parse_record_line(
    text: str,
    image_root: str | Path | None = None,
    bbox_format: str = "norm1000",
    *,
    poly_policy: str = "error",
    default_id: str | None = None,
    file: str = "",
    line: int = 0,
) -> tuple[Record | None, list[tuple[str, str]]]:
    """Parse one JSONL line -> (Record or None, [(problem, fix), ...]).

    `image_root` (an absolute directory, see `image_root_for`) is where relative image entries resolve; image
    records need it (`load_records` always gives it). Image files are checked here. Pixel boxes become bins.
    A record without `id` gets `default_id` (load_records gives "<file name>:<line>"); poly objects are an
    error, or dropped (counted in `Record.dropped_poly`) with poly_policy "drop".
    """
    data, problems = _parse_json(text)
    if problems:
        return None, problems
    problems = check_line(data, bbox_format, poly_policy)
    if not problems and "id" not in data and not default_id:
        problems = [("record has no id", "give an id, or load the file with load_records (ids from file:line)")]
    if problems:
        return None, problems
    size = (data["width"], data["height"]) if bbox_format == "pixel" else None
    boxes = [o for o in data["objects"] if "bbox_2d" in o]
    objects = tuple({"desc": o["desc"], "bbox_2d": _to_bins(o["bbox_2d"], size)} for o in boxes)
    meta = dict(
        id=data.get("id", default_id),
        objects=objects,
        file=file,
        line=line,
        dropped_poly=len(data["objects"]) - len(boxes),
    )
    if "scene" in data:
        return Record(scene=data["scene"], **meta), []
    if image_root is None:  # resolving against the working directory is exactly what the contract forbids
        return None, [("an image record needs an image root to resolve its images", "load the file with load_records")]
    entries = tuple(data["images"])
    paths = tuple(resolve_image(e, Path(image_root)) for e in entries)
    for entry, path in zip(entries, paths):
        problems.extend(check_image_file(entry, path, data["width"], data["height"]))
    if problems:
        return None, problems
    return Record(scene="", images=paths, width=data["width"], height=data["height"], image_entries=entries, **meta), []


def image_root_for(path: str | Path, image_root: str | Path | None = None) -> Path:
    """The absolute directory relative image entries of the JSONL `path` resolve against.

    None: the JSONL's own directory; a relative root: joined to that directory; an absolute root: itself.
    Never the working directory (a dataset must load the same from anywhere).
    """
    base = Path(path).resolve().parent
    if image_root is None:
        return base
    root = Path(image_root).expanduser()
    return Path(os.path.normpath(root if root.is_absolute() else base / root))


def _text_lines(path: Path):
    """(line number, text or None, problem or None) for each line; a line that is not UTF-8 is a problem."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8"), None
            except UnicodeDecodeError as exc:
                bad = raw[exc.start : exc.start + 1].hex()
                yield (
                    lineno,
                    None,
                    (
                        f"line is not UTF-8 text (byte 0x{bad} at column {exc.start + 1})",
                        "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                    ),
                )


def _check_path(path: Path) -> None:
    if path.is_dir():
        raise RecordError(
            [
                RecordIssue(
                    str(path),
                    0,
                    "is a directory, not a JSONL records file",
                    "point data.train_jsonl / data.val_jsonl at a .jsonl file inside it",
                )
            ]
        )
    if not path.exists():
        raise FileNotFoundError(f"records file {path} does not exist (fix: check data.train_jsonl / data.val_jsonl)")


def _duplicate_id(path: Path, lineno: int, rec_id: str, first_line: int) -> RecordIssue:
    """The issue of a record whose id an earlier line of the file already used."""
    return RecordIssue(
        str(path), lineno, f"duplicate id {rec_id!r} (first on line {first_line})", "give every record a unique id"
    )


def read_records(
    path: str | Path,
    limit: int | None = None,
    *,
    image_root: str | Path | None = None,
    bbox_format: str = "norm1000",
    poly_policy: str = "error",
) -> tuple[list[Record], list[RecordIssue]]:
    """Every valid record of `path` and every problem found (no exception for bad lines); see `load_records`."""
    if bbox_format not in BBOX_FORMATS:
        raise ValueError(f"bbox_format must be one of {BBOX_FORMATS}, got {bbox_format!r}")
    if poly_policy not in POLY_POLICIES:
        raise ValueError(f"poly_policy must be one of {POLY_POLICIES}, got {poly_policy!r}")
    path = Path(path)
    _check_path(path)
    root = image_root_for(path, image_root)
    records: list[Record] = []
    issues: list[RecordIssue] = []
    first_line_of: dict[str, int] = {}
    seen = 0
    for lineno, text, bad in _text_lines(path):
        if text is not None and not text.strip():
            continue
        if limit is not None and seen >= limit:
            break
        seen += 1
        rec, problems = (
            (None, [bad])
            if bad
            else parse_record_line(
                text,
                root,
                bbox_format,
                poly_policy=poly_policy,
                default_id=f"{path.name}:{lineno}",
                file=str(path),
                line=lineno,
            )
        )
        issues.extend(RecordIssue(str(path), lineno, msg, fix) for msg, fix in problems)
        if rec is None:
            continue
        if rec.id in first_line_of:
            issues.append(_duplicate_id(path, lineno, rec.id, first_line_of[rec.id]))
            continue
        first_line_of[rec.id] = lineno
        records.append(rec)
    if seen == 0:
        issues.append(
            RecordIssue(
                str(path),
                0,
                "has no records (the file is empty or blank)",
                "point the profile at a non-empty records file",
            )
        )
    return records, issues


def load_records(
    path: str | Path,
    limit: int | None = None,
    *,
    image_root: str | Path | None = None,
    bbox_format: str = "norm1000",
    poly_policy: str = "error",
) -> list[Record]:
    """Load and validate a records JSONL file (blank lines are skipped).

    Args:
        path: the .jsonl file.
        limit: read at most this many non-blank lines (the rest are neither read nor checked).
        image_root: where relative `images` entries resolve (see `image_root_for`); default the JSONL's directory.
        bbox_format: "norm1000" (integer bins 0..999 or "<|coord_N|>" strings) or "pixel" (pixels of width x
            height, converted to bins).
        poly_policy: "error" (a poly object is a problem) or "drop" (poly objects are skipped, counted per
            record in `Record.dropped_poly` and logged per file).
    Raises:
        RecordError: listing every malformed or non-UTF-8 line, missing, mis-sized or truncated image,
            duplicate id, and an empty file or a directory, as `file:line: problem (fix: ...)`.
        FileNotFoundError: if `path` does not exist.
        ValueError: if `bbox_format` or `poly_policy` is not a known value.
    """
    records, issues = read_records(path, limit, image_root=image_root, bbox_format=bbox_format, poly_policy=poly_policy)
    if issues:
        raise RecordError(issues)
    dropped = sum(r.dropped_poly for r in records)
    if dropped:
        log.warning(
            "%s: dropped %d poly object(s) in %d record(s) (data.poly_policy: drop)",
            path,
            dropped,
            sum(r.dropped_poly > 0 for r in records),
        )
    return records


def dump_records(records, path: str | Path) -> None:
    """Write records (Record or plain dicts) as JSONL, one compact line each, LF line ends.

    Image entries are written as loaded (relative stays relative), so write next to the source file (or keep
    the same image root) for the entries to resolve again; boxes are written as bins (norm1000).
    """
    with Path(path).open("w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            data = rec.as_json() if isinstance(rec, Record) else rec
            fh.write(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
