"""The record contract: one JSONL line per sample, and its strict loader (docs/DATA.md).

A text record is `{"id": "train-000001", "scene": "<text the model reads>", "objects": [{"desc": "cat",
"bbox_2d": [x1, y1, x2, y2]}, ...]}`; an image record is `{"id": ..., "images": ["images/000001.png"],
"width": 112, "height": 112, "objects": [...]}` (exactly one of `scene` / `images`). Boxes are integer bins
0..999 (bbox_format "norm1000") or pixels converted to bins on load ("pixel"); x1 <= x2 and y1 <= y2.
Image entries resolve against an image root (default: the JSONL's own directory, never the working
directory); the file must exist and its real size must equal width x height.
`load_records` checks every line and raises one `RecordError` listing all problems as
`file:line: problem (fix: ...)`. Imports nothing heavy (no torch, no transformers; PIL only for image records).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from toolkit.data.coords import MAX_BIN, pixel_to_bin

TEXT_KEYS = ("id", "scene", "objects")
IMAGE_KEYS = ("id", "images", "width", "height", "objects")
OBJECT_KEYS = ("desc", "bbox_2d")
BBOX_FORMATS = ("norm1000", "pixel")
MAX_LISTED = 20


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
        return {"id": self.id, "images": list(self.image_entries or self.images), "width": self.width,
                "height": self.height, "objects": objects}


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


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _check_corners(bbox, where: str) -> list[tuple[str, str]]:
    x1, y1, x2, y2 = bbox
    if x1 > x2 or y1 > y2:
        return [(f"{where}.bbox_2d must have x1<=x2 and y1<=y2, got {bbox!r}",
                 "order the corners as [x1, y1, x2, y2] with the top-left first")]
    return []


def _check_bbox(bbox, where: str) -> list[tuple[str, str]]:
    if not isinstance(bbox, list) or len(bbox) != 4:
        return [(f"{where}.bbox_2d must be a list of 4 integers [x1, y1, x2, y2], got {bbox!r}",
                 "write four integer bins, e.g. [120, 40, 300, 210]")]
    bad = [v for v in bbox if not _is_int(v)]
    if bad:
        hint = " (floats are not bins)" if any(isinstance(v, float) and math.isfinite(v) for v in bad) else ""
        return [(f"{where}.bbox_2d values must be integers{hint}, got {bbox!r}",
                 f"quantize coordinates to integer bins 0..{MAX_BIN}, or load pixel boxes with bbox_format='pixel'")]
    problems = []
    out = [v for v in bbox if not 0 <= v <= MAX_BIN]
    if out:
        problems.append((f"{where}.bbox_2d has bins outside 0..{MAX_BIN}: {out}", f"clamp bins to 0..{MAX_BIN}"))
    return problems + _check_corners(bbox, where)


def _check_pixel_bbox(bbox, where: str, width: int, height: int) -> list[tuple[str, str]]:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return [(f"{where}.bbox_2d must be a list of 4 pixel numbers [x1, y1, x2, y2], got {bbox!r}",
                 "write four numbers in pixels, e.g. [12, 4, 30.5, 21]")]
    problems = []
    x1, y1, x2, y2 = bbox
    if not (0 <= x1 <= width and 0 <= x2 <= width and 0 <= y1 <= height and 0 <= y2 <= height):
        problems.append((f"{where}.bbox_2d {bbox!r} is outside the {width}x{height} image",
                         f"keep 0 <= x <= {width} and 0 <= y <= {height} (pixels)"))
    return problems + _check_corners(bbox, where)


def _check_object(obj, k: int, size: tuple[int, int] | None) -> list[tuple[str, str]]:
    """`size` is (width, height) when boxes are pixels, None when they are bins."""
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
        if size is None:
            problems.extend(_check_bbox(obj["bbox_2d"], where))
        else:
            problems.extend(_check_pixel_bbox(obj["bbox_2d"], where, *size))
    return problems


def _check_kind(data: dict) -> list[tuple[str, str]]:
    """Exactly one of scene (text record) / images (image record)."""
    if "scene" in data and "images" in data:
        return [("record has both scene and images", "a text record has scene, an image record has images: keep one")]
    if "scene" not in data and "images" not in data:
        return [("missing required keys ['scene'] or ['images']: a record has exactly one of them",
                 "add scene (text record) or images + width + height (image record)")]
    return []


def _check_keys(data: dict) -> list[tuple[str, str]]:
    keys = IMAGE_KEYS if "images" in data else TEXT_KEYS
    problems = []
    if "images" not in data:
        stray = sorted(k for k in data if k in ("width", "height"))
        if stray:
            problems.append((f"keys {stray} belong to image records", "drop them, or give images instead of scene"))
    extra = sorted(set(data) - set(TEXT_KEYS) - set(IMAGE_KEYS))
    if extra:
        problems.append((f"unknown keys {extra}", f"keep only {list(keys)}"))
    missing = [k for k in keys if k not in data and k not in ("scene", "images")]
    if missing and not ("scene" in data and "images" in data):  # the kind is unclear: _check_kind said so
        problems.append((f"missing required keys {missing}", f"every record of this kind needs {list(keys)}"))
    return problems


def _check_image_fields(data: dict) -> list[tuple[str, str]]:
    problems = []
    images = data["images"]
    if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str) or not images[0].strip():
        problems.append((f"images must be a list of exactly one non-empty path string, got {images!r}",
                         'write e.g. "images": ["images/000001.png"] (boxes refer to that one image)'))
    for key in ("width", "height"):
        if key in data and not (_is_int(data[key]) and data[key] > 0):
            problems.append((f"{key} must be a positive integer (pixels), got {data[key]!r}",
                             "give the image's real size in pixels"))
    return problems


def _pixel_size(data: dict, bbox_format: str) -> tuple[tuple[int, int] | None, list[tuple[str, str]]]:
    """(width, height) for pixel boxes, None for bins; a problem when pixel boxes lack a usable size."""
    if bbox_format == "norm1000":
        return None, []
    w, h = data.get("width"), data.get("height")
    if _is_int(w) and _is_int(h) and w > 0 and h > 0:
        return (w, h), []
    if "images" in data and "width" in data and "height" in data:
        return None, [("pixel boxes need a valid width and height", "fix width/height (reported above)")]
    return None, [("bbox_format 'pixel' needs width and height (image records)",
                   "give width and height, or load bin boxes with bbox_format='norm1000'")]


def _check_line(data, bbox_format: str) -> list[tuple[str, str]]:
    if not isinstance(data, dict):
        return [(f"a record must be a JSON object, got {type(data).__name__}", 'write {"id": ..., "scene": ..., "objects": [...]}')]
    problems = _check_kind(data) + _check_keys(data)
    if "id" in data and (not isinstance(data["id"], str) or not data["id"]):
        problems.append((f"id must be a non-empty string, got {data['id']!r}", 'use e.g. "train-000001"'))
    if "scene" in data and (not isinstance(data["scene"], str) or not data["scene"].strip()):
        problems.append((f"scene must be a non-empty string, got {data['scene']!r}", "describe the scene as text"))
    if "images" in data:
        problems.extend(_check_image_fields(data))
    size, size_problems = _pixel_size(data, bbox_format)
    problems.extend(size_problems)
    objects = data.get("objects")
    if "objects" in data and not isinstance(objects, list):
        problems.append((f"objects must be a list, got {type(objects).__name__}", "use [] for an empty scene"))
    elif isinstance(objects, list) and not size_problems:
        for k, obj in enumerate(objects):
            problems.extend(_check_object(obj, k, size))
    return problems


def _strict_pairs(pairs):
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate keys {dupes}")
    return dict(pairs)


def _to_bins(bbox: list, size: tuple[int, int] | None) -> list[int]:
    if size is None:
        return list(bbox)
    w, h = size
    return [pixel_to_bin(bbox[0], w), pixel_to_bin(bbox[1], h), pixel_to_bin(bbox[2], w), pixel_to_bin(bbox[3], h)]


def resolve_image(entry: str, image_root: Path) -> str:
    """Absolute path of one `images` entry: absolute entries stay, relative ones join `image_root`."""
    path = Path(entry).expanduser()
    return os.path.normpath(path if path.is_absolute() else image_root / path)


def _check_image_file(entry: str, path: str, width: int, height: int) -> list[tuple[str, str]]:
    """The file exists, is an image, and its real size is width x height (PIL reads the header only)."""
    if not os.path.isfile(path):
        return [(f"image {entry!r} not found at {path}",
                 "check the entry; relative entries resolve against the image root (data.image_root, "
                 "default: the JSONL file's directory), not the working directory")]
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            real = im.size
    except (OSError, UnidentifiedImageError) as exc:
        return [(f"image {entry!r} at {path} is not a readable image: {exc}", "replace it with a PNG or JPEG file")]
    if real != (width, height):
        return [(f"image {entry!r} is {real[0]}x{real[1]} pixels but the record says width={width}, height={height}",
                 f"set width={real[0]}, height={real[1]} (boxes must refer to the real size)")]
    return []


def parse_record_line(text: str, image_root: str | Path | None = None,
                      bbox_format: str = "norm1000") -> tuple[Record | None, list[tuple[str, str]]]:
    """Parse one JSONL line -> (Record or None, [(problem, fix), ...]).

    `image_root` (an absolute directory, see `image_root_for`) is where relative image entries resolve; image
    records need it (`load_records` always gives it). Image files are checked here. Pixel boxes become bins.
    """
    try:
        data = json.loads(text, object_pairs_hook=_strict_pairs)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError; so are duplicate keys
        return None, [(f"not valid JSON: {exc}", "write one JSON object per line")]
    problems = _check_line(data, bbox_format)
    if problems:
        return None, problems
    size = (data["width"], data["height"]) if bbox_format == "pixel" else None
    objects = tuple({"desc": o["desc"], "bbox_2d": _to_bins(o["bbox_2d"], size)} for o in data["objects"])
    if "scene" in data:
        return Record(id=data["id"], scene=data["scene"], objects=objects), []
    if image_root is None:  # resolving against the working directory is exactly what the contract forbids
        return None, [("an image record needs an image root to resolve its images", "load the file with load_records")]
    entries = tuple(data["images"])
    paths = tuple(resolve_image(e, Path(image_root)) for e in entries)
    for entry, path in zip(entries, paths):
        problems.extend(_check_image_file(entry, path, data["width"], data["height"]))
    if problems:
        return None, problems
    return Record(id=data["id"], scene="", objects=objects, images=paths, width=data["width"],
                  height=data["height"], image_entries=entries), []


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


def load_records(path: str | Path, limit: int | None = None, *, image_root: str | Path | None = None,
                 bbox_format: str = "norm1000") -> list[Record]:
    """Load and validate a records JSONL file (blank lines are skipped).

    Args:
        path: the .jsonl file.
        limit: read at most this many non-blank lines (the rest are neither read nor checked).
        image_root: where relative `images` entries resolve (see `image_root_for`); default the JSONL's directory.
        bbox_format: "norm1000" (integer bins 0..999) or "pixel" (pixels of width x height, converted to bins).
    Raises:
        RecordError: listing every malformed line, missing or mis-sized image and duplicate id, as
            `file:line: problem (fix: ...)`.
        FileNotFoundError: if `path` does not exist.
        ValueError: if `bbox_format` is not one of BBOX_FORMATS.
    """
    if bbox_format not in BBOX_FORMATS:
        raise ValueError(f"bbox_format must be one of {BBOX_FORMATS}, got {bbox_format!r}")
    path = Path(path)
    root = image_root_for(path, image_root)
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
            rec, problems = parse_record_line(text, root, bbox_format)
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
    """Write records (Record or plain dicts) as JSONL, one compact line each, LF line ends.

    Image entries are written as loaded (relative stays relative), so write next to the source file (or keep
    the same image root) for the entries to resolve again; boxes are written as bins (norm1000).
    """
    with Path(path).open("w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            data = rec.as_json() if isinstance(rec, Record) else rec
            fh.write(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
