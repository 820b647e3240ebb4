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
`load_records` checks every line and raises one `RecordError` listing all problems as
`file:line: problem (fix: ...)`. Imports nothing heavy (no torch, no transformers; PIL only for image records).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.data.coords import MAX_BIN, parse_coord_token, pixel_to_bin

TEXT_KEYS = ("id", "scene", "objects")
IMAGE_KEYS = ("id", "images", "width", "height", "objects")
OPTIONAL_KEYS = ("id", "summary", "metadata")  # the predecessor's optional keys (summary/metadata are ignored)
OBJECT_KEYS = ("desc", "bbox_2d", "poly", "poly_points")
BBOX_FORMATS = ("norm1000", "pixel")
POLY_POLICIES = ("error", "drop")
MAX_LISTED = 20
# Chat/vision control markers such as <|im_end|> or <|image_pad|>: in record text the tokenizer would read
# them as turn or image markers. Only coordinate tokens <|coord_N|> may appear (in scene text).
CONTROL_RE = re.compile(r"<\|[^|<>\s]{1,64}\|>")
PNG_END = b"IEND\xaeB`\x82"
JPEG_END = b"\xff\xd9"
TAIL_BYTES = 1024

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
        return {"id": self.id, "images": list(self.image_entries or self.images), "width": self.width,
                "height": self.height, "objects": objects}


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


def _as_bin(v) -> int | None:
    """A bin value as written: an integer, or a coord-token string "<|coord_N|>" (the *.coord.jsonl surface)."""
    if _is_int(v):
        return v
    return parse_coord_token(v) if isinstance(v, str) else None


def _bin_values(values, what: str) -> tuple[list[int] | None, list[tuple[str, str]]]:
    """Bins of a list of bin values, or None and the problems (wrong type, outside 0..999)."""
    bins = [_as_bin(v) for v in values]
    if any(b is None for b in bins):
        hint = " (floats are not bins)" if any(isinstance(v, float) and math.isfinite(v) for v in values) else ""
        return None, [(f"{what} values must be integer bins or coord tokens \"<|coord_N|>\"{hint}, got {values!r}",
                       f"quantize coordinates to integer bins 0..{MAX_BIN}, or load pixel boxes with bbox_format='pixel'")]
    out = [v for v in bins if not 0 <= v <= MAX_BIN]
    if out:
        return None, [(f"{what} has bins outside 0..{MAX_BIN}: {out}", f"clamp bins to 0..{MAX_BIN}")]
    return bins, []


def _check_bbox(bbox, where: str) -> list[tuple[str, str]]:
    if not isinstance(bbox, list) or len(bbox) != 4:
        return [(f"{where}.bbox_2d must be a list of 4 integers [x1, y1, x2, y2], got {bbox!r}",
                 "write four integer bins, e.g. [120, 40, 300, 210]")]
    bins, problems = _bin_values(bbox, f"{where}.bbox_2d")
    return problems or _check_corners(bins, where)


def _pixel_hint(values) -> str:
    return " (coord tokens are bins: load them with bbox_format='norm1000')" if any(isinstance(v, str) for v in values) else ""


def _check_pixel_bbox(bbox, where: str, width: int, height: int) -> list[tuple[str, str]]:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        hint = _pixel_hint(bbox) if isinstance(bbox, list) else ""
        return [(f"{where}.bbox_2d must be a list of 4 pixel numbers [x1, y1, x2, y2]{hint}, got {bbox!r}",
                 "write four numbers in pixels, e.g. [12, 4, 30.5, 21]")]
    problems = []
    x1, y1, x2, y2 = bbox
    if not (0 <= x1 <= width and 0 <= x2 <= width and 0 <= y1 <= height and 0 <= y2 <= height):
        problems.append((f"{where}.bbox_2d {bbox!r} is outside the {width}x{height} image",
                         f"keep 0 <= x <= {width} and 0 <= y <= {height} (pixels)"))
    return problems + _check_corners(bbox, where)


def _check_poly(obj: dict, where: str, size: tuple[int, int] | None) -> list[tuple[str, str]]:
    """A poly is a flat [x1, y1, x2, y2, ...] list of >= 3 points; poly_points, when given, is its point count."""
    poly = obj["poly"]
    if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
        return [(f"{where}.poly must be a flat list of an even number (>= 6) of coordinates, got {poly!r}",
                 "write [x1, y1, x2, y2, x3, y3, ...] (at least 3 points)")]
    if size is None:
        problems = _bin_values(poly, f"{where}.poly")[1]
    elif not all(_is_number(v) for v in poly):
        problems = [(f"{where}.poly values must be pixel numbers{_pixel_hint(poly)}, got {poly!r}", "write pixels")]
    else:
        problems = []
    points = obj.get("poly_points", len(poly) // 2)
    if not _is_int(points) or points != len(poly) // 2:
        problems.append((f"{where}.poly_points is {points!r} but poly has {len(poly) // 2} points",
                         "set poly_points to len(poly) / 2, or drop it"))
    return problems


def _control_tokens(text: str, allow_coords: bool) -> list[str]:
    found = CONTROL_RE.findall(text)
    return sorted({t for t in found if not (allow_coords and parse_coord_token(t) is not None)})


def _control_problem(what: str, tokens: list[str]) -> tuple[str, str]:
    return (f"{what} contains chat control token(s) {tokens}: the tokenizer would read them as turn or image markers",
            "remove them from the text (only <|coord_N|> tokens may appear, and only in scene)")


def _check_geometry(obj: dict, where: str, size, poly_policy: str) -> list[tuple[str, str]]:
    """Exactly one of bbox_2d / poly; a poly is an error unless poly_policy is "drop"."""
    if "bbox_2d" in obj and "poly" in obj:
        return [(f"{where} has both bbox_2d and poly", "give exactly one geometry per object")]
    if "poly_points" in obj and "poly" not in obj:
        return [(f"{where}.poly_points is given without poly", "drop poly_points, or give the poly")]
    if "poly" in obj:
        problems = _check_poly(obj, where, size)
        if poly_policy == "error":
            problems.append((f"{where} is a poly: Stage-2 trains boxes only (data.poly_policy is 'error')",
                             "set data.poly_policy: drop to skip poly objects (counted per file), "
                             "or replace the poly by its bbox_2d"))
        return problems
    if "bbox_2d" not in obj:
        return [(f"{where} is missing bbox_2d", "every object needs desc and bbox_2d")]
    return _check_bbox(obj["bbox_2d"], where) if size is None else _check_pixel_bbox(obj["bbox_2d"], where, *size)


def _check_object(obj, k: int, size: tuple[int, int] | None, poly_policy: str = "error") -> list[tuple[str, str]]:
    """`size` is (width, height) when boxes are pixels, None when they are bins."""
    where = f"objects[{k}]"
    if not isinstance(obj, dict):
        return [(f"{where} must be an object {{desc, bbox_2d}}, got {type(obj).__name__}",
                 'write {"desc": "cat", "bbox_2d": [x1, y1, x2, y2]}')]
    problems = []
    if "desc" not in obj:
        problems.append((f"{where} is missing desc", "every object needs desc and bbox_2d"))
    extra = sorted(set(obj) - set(OBJECT_KEYS))
    if extra:
        problems.append((f"{where} has unknown keys {extra}", "keep only desc and bbox_2d (or poly)"))
    desc = obj.get("desc")
    if "desc" in obj and (not isinstance(desc, str) or not desc.strip()):
        problems.append((f"{where}.desc must be a non-empty string, got {desc!r}", "give the class name, e.g. \"cat\""))
    elif isinstance(desc, str) and _control_tokens(desc, allow_coords=False):
        problems.append(_control_problem(f"{where}.desc", _control_tokens(desc, allow_coords=False)))
    return problems + _check_geometry(obj, where, size, poly_policy)


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
    extra = sorted(set(data) - set(TEXT_KEYS) - set(IMAGE_KEYS) - set(OPTIONAL_KEYS))
    if extra:
        problems.append((f"unknown keys {extra}", f"keep only {list(keys)} (and optionally summary, metadata)"))
    missing = [k for k in keys if k not in data and k not in ("id", "scene", "images")]
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


def _check_optional(data: dict) -> list[tuple[str, str]]:
    problems = []
    if "id" in data and (not isinstance(data["id"], str) or not data["id"]):
        problems.append((f"id must be a non-empty string, got {data['id']!r}",
                         'use e.g. "train-000001", or leave it out (derived from file and line)'))
    if "summary" in data and not isinstance(data["summary"], str):
        problems.append((f"summary must be a string, got {type(data['summary']).__name__}", "write text, or drop it"))
    if "metadata" in data and not isinstance(data["metadata"], dict):
        problems.append((f"metadata must be a JSON object, got {type(data['metadata']).__name__}", "write {...}, or drop it"))
    return problems


def _check_scene(scene) -> list[tuple[str, str]]:
    if not isinstance(scene, str) or not scene.strip():
        return [(f"scene must be a non-empty string, got {scene!r}", "describe the scene as text")]
    tokens = _control_tokens(scene, allow_coords=True)
    return [_control_problem("scene", tokens)] if tokens else []


def _check_line(data, bbox_format: str, poly_policy: str = "error") -> list[tuple[str, str]]:
    if not isinstance(data, dict):
        return [(f"a record must be a JSON object, got {type(data).__name__}", 'write {"id": ..., "scene": ..., "objects": [...]}')]
    problems = _check_kind(data) + _check_keys(data) + _check_optional(data)
    if "scene" in data:
        problems.extend(_check_scene(data["scene"]))
    if "images" in data:
        problems.extend(_check_image_fields(data))
    size, size_problems = _pixel_size(data, bbox_format)
    problems.extend(size_problems)
    objects = data.get("objects")
    if "objects" in data and not isinstance(objects, list):
        problems.append((f"objects must be a list, got {type(objects).__name__}", "use [] for an empty scene"))
    elif isinstance(objects, list) and not size_problems:
        for k, obj in enumerate(objects):
            problems.extend(_check_object(obj, k, size, poly_policy))
    return problems


def _strict_pairs(pairs):
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate keys {dupes}")
    return dict(pairs)


def _to_bins(bbox: list, size: tuple[int, int] | None) -> list[int]:
    if size is None:
        return [_as_bin(v) for v in bbox]
    w, h = size
    return [pixel_to_bin(bbox[0], w), pixel_to_bin(bbox[1], h), pixel_to_bin(bbox[2], w), pixel_to_bin(bbox[3], h)]


def resolve_image(entry: str, image_root: Path) -> str:
    """Absolute path of one `images` entry: absolute entries stay, relative ones join `image_root`."""
    path = Path(entry).expanduser()
    return os.path.normpath(path if path.is_absolute() else image_root / path)


def _truncated(path: str, fmt: str | None) -> str | None:
    """The missing end marker's name when a PNG/JPEG file lacks it (cut short), else None.

    The header check cannot see a file cut short; a full decode of every image at load would be slow, so the
    loader reads the last TAIL_BYTES and looks for the format's end marker (PNG IEND chunk, JPEG EOI).
    Other formats, and damage inside a complete file, are found only by decoding (`stage2 data check --decode`).
    """
    marker = {"PNG": (PNG_END, "PNG IEND chunk"), "JPEG": (JPEG_END, "JPEG end-of-image marker")}.get(fmt or "")
    if marker is None:
        return None
    with open(path, "rb") as fh:
        fh.seek(max(0, os.path.getsize(path) - TAIL_BYTES))
        return None if marker[0] in fh.read() else marker[1]


def _check_image_file(entry: str, path: str, width: int, height: int) -> list[tuple[str, str]]:
    """The file exists, is an image, is not cut short, and its real size is width x height (header only)."""
    if not os.path.isfile(path):
        return [(f"image {entry!r} not found at {path}",
                 "check the entry; relative entries resolve against the image root (data.image_root, "
                 "default: the JSONL file's directory), not the working directory")]
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            real, fmt = im.size, im.format
    except Image.DecompressionBombError as exc:
        return [(f"image {entry!r} at {path} is too large to decode safely: {exc}",
                 "resize it offline (e.g. stage2 data convert --max-side 1024, docs/DATA.md)")]
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return [(f"image {entry!r} at {path} is not a readable image: {exc}", "replace it with a PNG or JPEG file")]
    if real != (width, height):
        return [(f"image {entry!r} is {real[0]}x{real[1]} pixels but the record says width={width}, height={height}",
                 f"set width={real[0]}, height={real[1]} (boxes must refer to the real size)")]
    missing = _truncated(path, fmt)
    if missing:
        return [(f"image {entry!r} at {path} is truncated (no {missing} in its last {TAIL_BYTES} bytes): "
                 "its header reads but decoding it in training would fail", "re-export or re-copy the file")]
    return []


def _parse_json(text: str) -> tuple[object, list[tuple[str, str]]]:
    try:
        return json.loads(text, object_pairs_hook=_strict_pairs), []
    except ValueError as exc:  # json.JSONDecodeError is a ValueError; so are duplicate keys
        return None, [(f"not valid JSON: {exc}", "write one JSON object per line")]
    except RecursionError:
        return None, [("JSON nested too deeply to parse (over Python's recursion limit)",
                       "a record is flat: {images, width, height, objects: [{desc, bbox_2d}]}")]


def parse_record_line(text: str, image_root: str | Path | None = None, bbox_format: str = "norm1000", *,
                      poly_policy: str = "error", default_id: str | None = None, file: str = "",
                      line: int = 0) -> tuple[Record | None, list[tuple[str, str]]]:
    """Parse one JSONL line -> (Record or None, [(problem, fix), ...]).

    `image_root` (an absolute directory, see `image_root_for`) is where relative image entries resolve; image
    records need it (`load_records` always gives it). Image files are checked here. Pixel boxes become bins.
    A record without `id` gets `default_id` (load_records gives "<file name>:<line>"); poly objects are an
    error, or dropped (counted in `Record.dropped_poly`) with poly_policy "drop".
    """
    data, problems = _parse_json(text)
    if problems:
        return None, problems
    problems = _check_line(data, bbox_format, poly_policy)
    if not problems and "id" not in data and not default_id:
        problems = [("record has no id", "give an id, or load the file with load_records (ids from file:line)")]
    if problems:
        return None, problems
    size = (data["width"], data["height"]) if bbox_format == "pixel" else None
    boxes = [o for o in data["objects"] if "bbox_2d" in o]
    objects = tuple({"desc": o["desc"], "bbox_2d": _to_bins(o["bbox_2d"], size)} for o in boxes)
    meta = dict(id=data.get("id", default_id), objects=objects, file=file, line=line,
                dropped_poly=len(data["objects"]) - len(boxes))
    if "scene" in data:
        return Record(scene=data["scene"], **meta), []
    if image_root is None:  # resolving against the working directory is exactly what the contract forbids
        return None, [("an image record needs an image root to resolve its images", "load the file with load_records")]
    entries = tuple(data["images"])
    paths = tuple(resolve_image(e, Path(image_root)) for e in entries)
    for entry, path in zip(entries, paths):
        problems.extend(_check_image_file(entry, path, data["width"], data["height"]))
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
                bad = raw[exc.start:exc.start + 1].hex()
                yield lineno, None, (f"line is not UTF-8 text (byte 0x{bad} at column {exc.start + 1})",
                                     "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _check_path(path: Path) -> None:
    if path.is_dir():
        raise RecordError([RecordIssue(str(path), 0, "is a directory, not a JSONL records file",
                                       "point data.train_jsonl / data.val_jsonl at a .jsonl file inside it")])
    if not path.exists():
        raise FileNotFoundError(f"records file {path} does not exist (fix: check data.train_jsonl / data.val_jsonl)")


def read_records(path: str | Path, limit: int | None = None, *, image_root: str | Path | None = None,
                 bbox_format: str = "norm1000", poly_policy: str = "error") -> tuple[list[Record], list[RecordIssue]]:
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
        rec, problems = (None, [bad]) if bad else parse_record_line(
            text, root, bbox_format, poly_policy=poly_policy, default_id=f"{path.name}:{lineno}",
            file=str(path), line=lineno)
        issues.extend(RecordIssue(str(path), lineno, msg, fix) for msg, fix in problems)
        if rec is None:
            continue
        if rec.id in first_line_of:
            issues.append(RecordIssue(str(path), lineno, f"duplicate id {rec.id!r} (first on line {first_line_of[rec.id]})",
                                      "give every record a unique id"))
            continue
        first_line_of[rec.id] = lineno
        records.append(rec)
    if seen == 0:
        issues.append(RecordIssue(str(path), 0, "has no records (the file is empty or blank)",
                                  "point the profile at a non-empty records file"))
    return records, issues


def load_records(path: str | Path, limit: int | None = None, *, image_root: str | Path | None = None,
                 bbox_format: str = "norm1000", poly_policy: str = "error") -> list[Record]:
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
        log.warning("%s: dropped %d poly object(s) in %d record(s) (data.poly_policy: drop)", path, dropped,
                    sum(r.dropped_poly > 0 for r in records))
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
