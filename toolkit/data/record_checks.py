"""The checks of the record contract (docs/DATA.md; the loader is toolkit/data/records.py): one parsed JSONL line
or one image file in, a list of (problem, fix) pairs out, empty when it follows the contract.

Imports nothing heavy (PIL only inside `check_image_file`).
"""

from __future__ import annotations

import math
import os
import re

from toolkit.data.coords import MAX_BIN, parse_coord_token

TEXT_KEYS = ("id", "scene", "objects")
IMAGE_KEYS = ("id", "images", "width", "height", "objects")
OPTIONAL_KEYS = ("id", "summary", "metadata")  # the predecessor's optional keys (summary/metadata are ignored)
OBJECT_KEYS = ("desc", "bbox_2d", "poly", "poly_points")
# Chat/vision control markers such as <|im_end|> or <|image_pad|>: in record text the tokenizer would read
# them as turn or image markers. Only coordinate tokens <|coord_N|> may appear (in scene text).
CONTROL_RE = re.compile(r"<\|[^|<>\s]{1,64}\|>")
PNG_END = b"IEND\xaeB`\x82"
JPEG_END = b"\xff\xd9"
TAIL_BYTES = 1024


def _is_int(v) -> bool:
    # bool is an int subclass; a JSON `true` is never a coordinate.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _check_corners(bbox, where: str) -> list[tuple[str, str]]:
    x1, y1, x2, y2 = bbox
    if x1 > x2 or y1 > y2:
        return [
            (
                f"{where}.bbox_2d must have x1<=x2 and y1<=y2, got {bbox!r}",
                "order the corners as [x1, y1, x2, y2] with the top-left first",
            )
        ]
    return []


def as_bin(v) -> int | None:
    """A bin value as written: an integer, or a coord-token string "<|coord_N|>" (the *.coord.jsonl surface)."""
    if _is_int(v):
        return v
    return parse_coord_token(v) if isinstance(v, str) else None


def _bin_values(values, what: str) -> tuple[list[int] | None, list[tuple[str, str]]]:
    """Bins of a list of bin values, or None and the problems (wrong type, outside 0..999)."""
    bins = [as_bin(v) for v in values]
    if any(b is None for b in bins):
        hint = " (floats are not bins)" if any(isinstance(v, float) and math.isfinite(v) for v in values) else ""
        return None, [
            (
                f'{what} values must be integer bins or coord tokens "<|coord_N|>"{hint}, got {values!r}',
                f"quantize coordinates to integer bins 0..{MAX_BIN}, or load pixel boxes with bbox_format='pixel'",
            )
        ]
    out = [v for v in bins if not 0 <= v <= MAX_BIN]
    if out:
        return None, [(f"{what} has bins outside 0..{MAX_BIN}: {out}", f"clamp bins to 0..{MAX_BIN}")]
    return bins, []


def _check_bbox(bbox, where: str) -> list[tuple[str, str]]:
    if not isinstance(bbox, list) or len(bbox) != 4:
        return [
            (
                f"{where}.bbox_2d must be a list of 4 integers [x1, y1, x2, y2], got {bbox!r}",
                "write four integer bins, e.g. [120, 40, 300, 210]",
            )
        ]
    bins, problems = _bin_values(bbox, f"{where}.bbox_2d")
    return problems or _check_corners(bins, where)


def _pixel_hint(values) -> str:
    if any(isinstance(v, str) for v in values):
        return " (coord tokens are bins: load them with bbox_format='norm1000')"
    return ""


def _check_pixel_bbox(bbox, where: str, width: int, height: int) -> list[tuple[str, str]]:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        hint = _pixel_hint(bbox) if isinstance(bbox, list) else ""
        return [
            (
                f"{where}.bbox_2d must be a list of 4 pixel numbers [x1, y1, x2, y2]{hint}, got {bbox!r}",
                "write four numbers in pixels, e.g. [12, 4, 30.5, 21]",
            )
        ]
    problems = []
    x1, y1, x2, y2 = bbox
    if not (0 <= x1 <= width and 0 <= x2 <= width and 0 <= y1 <= height and 0 <= y2 <= height):
        problems.append(
            (
                f"{where}.bbox_2d {bbox!r} is outside the {width}x{height} image",
                f"keep 0 <= x <= {width} and 0 <= y <= {height} (pixels)",
            )
        )
    return problems + _check_corners(bbox, where)


def _check_poly(obj: dict, where: str, size: tuple[int, int] | None) -> list[tuple[str, str]]:
    """A poly is a flat [x1, y1, x2, y2, ...] list of >= 3 points; poly_points, when given, is its point count."""
    poly = obj["poly"]
    if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
        return [
            (
                f"{where}.poly must be a flat list of an even number (>= 6) of coordinates, got {poly!r}",
                "write [x1, y1, x2, y2, x3, y3, ...] (at least 3 points)",
            )
        ]
    if size is None:
        problems = _bin_values(poly, f"{where}.poly")[1]
    elif not all(_is_number(v) for v in poly):
        problems = [(f"{where}.poly values must be pixel numbers{_pixel_hint(poly)}, got {poly!r}", "write pixels")]
    else:
        problems = []
    points = obj.get("poly_points", len(poly) // 2)
    if not _is_int(points) or points != len(poly) // 2:
        problems.append(
            (
                f"{where}.poly_points is {points!r} but poly has {len(poly) // 2} points",
                "set poly_points to len(poly) / 2, or drop it",
            )
        )
    return problems


def _control_tokens(text: str, allow_coords: bool) -> list[str]:
    found = CONTROL_RE.findall(text)
    return sorted({t for t in found if not (allow_coords and parse_coord_token(t) is not None)})


def _control_problem(what: str, tokens: list[str]) -> tuple[str, str]:
    return (
        f"{what} contains chat control token(s) {tokens}: the tokenizer would read them as turn or image markers",
        "remove them from the text (only <|coord_N|> tokens may appear, and only in scene)",
    )


def _check_geometry(obj: dict, where: str, size, poly_policy: str) -> list[tuple[str, str]]:
    """Exactly one of bbox_2d / poly; a poly is an error unless poly_policy is "drop"."""
    if "bbox_2d" in obj and "poly" in obj:
        return [(f"{where} has both bbox_2d and poly", "give exactly one geometry per object")]
    if "poly_points" in obj and "poly" not in obj:
        return [(f"{where}.poly_points is given without poly", "drop poly_points, or give the poly")]
    if "poly" in obj:
        problems = _check_poly(obj, where, size)
        if poly_policy == "error":
            problems.append(
                (
                    f"{where} is a poly: Stage-2 trains boxes only (data.poly_policy is 'error')",
                    "set data.poly_policy: drop to skip poly objects (counted per file), "
                    "or replace the poly by its bbox_2d",
                )
            )
        return problems
    if "bbox_2d" not in obj:
        return [(f"{where} is missing bbox_2d", "every object needs desc and bbox_2d")]
    return _check_bbox(obj["bbox_2d"], where) if size is None else _check_pixel_bbox(obj["bbox_2d"], where, *size)


def _check_object(obj, k: int, size: tuple[int, int] | None, poly_policy: str = "error") -> list[tuple[str, str]]:
    """`size` is (width, height) when boxes are pixels, None when they are bins."""
    where = f"objects[{k}]"
    if not isinstance(obj, dict):
        return [
            (
                f"{where} must be an object {{desc, bbox_2d}}, got {type(obj).__name__}",
                'write {"desc": "cat", "bbox_2d": [x1, y1, x2, y2]}',
            )
        ]
    problems = []
    if "desc" not in obj:
        problems.append((f"{where} is missing desc", "every object needs desc and bbox_2d"))
    extra = sorted(set(obj) - set(OBJECT_KEYS))
    if extra:
        problems.append((f"{where} has unknown keys {extra}", "keep only desc and bbox_2d (or poly)"))
    desc = obj.get("desc")
    if "desc" in obj and (not isinstance(desc, str) or not desc.strip()):
        problems.append((f"{where}.desc must be a non-empty string, got {desc!r}", 'give the class name, e.g. "cat"'))
    elif isinstance(desc, str) and _control_tokens(desc, allow_coords=False):
        problems.append(_control_problem(f"{where}.desc", _control_tokens(desc, allow_coords=False)))
    return problems + _check_geometry(obj, where, size, poly_policy)


def _check_kind(data: dict) -> list[tuple[str, str]]:
    """Exactly one of scene (text record) / images (image record)."""
    if "scene" in data and "images" in data:
        return [("record has both scene and images", "a text record has scene, an image record has images: keep one")]
    if "scene" not in data and "images" not in data:
        return [
            (
                "missing required keys ['scene'] or ['images']: a record has exactly one of them",
                "add scene (text record) or images + width + height (image record)",
            )
        ]
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
        problems.append(
            (
                f"images must be a list of exactly one non-empty path string, got {images!r}",
                'write e.g. "images": ["images/000001.png"] (boxes refer to that one image)',
            )
        )
    for key in ("width", "height"):
        if key in data and not (_is_int(data[key]) and data[key] > 0):
            problems.append(
                (
                    f"{key} must be a positive integer (pixels), got {data[key]!r}",
                    "give the image's real size in pixels",
                )
            )
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
    return None, [
        (
            "bbox_format 'pixel' needs width and height (image records)",
            "give width and height, or load bin boxes with bbox_format='norm1000'",
        )
    ]


def _check_optional(data: dict) -> list[tuple[str, str]]:
    problems = []
    if "id" in data and (not isinstance(data["id"], str) or not data["id"]):
        problems.append(
            (
                f"id must be a non-empty string, got {data['id']!r}",
                'use e.g. "train-000001", or leave it out (derived from file and line)',
            )
        )
    if "summary" in data and not isinstance(data["summary"], str):
        problems.append((f"summary must be a string, got {type(data['summary']).__name__}", "write text, or drop it"))
    if "metadata" in data and not isinstance(data["metadata"], dict):
        problems.append(
            (f"metadata must be a JSON object, got {type(data['metadata']).__name__}", "write {...}, or drop it")
        )
    return problems


def _check_scene(scene) -> list[tuple[str, str]]:
    if not isinstance(scene, str) or not scene.strip():
        return [(f"scene must be a non-empty string, got {scene!r}", "describe the scene as text")]
    tokens = _control_tokens(scene, allow_coords=True)
    return [_control_problem("scene", tokens)] if tokens else []


def check_line(data, bbox_format: str, poly_policy: str = "error") -> list[tuple[str, str]]:
    """Every problem of one parsed JSON line (any JSON value): its kind, keys and optional fields, the scene or
    image fields, and each object (objects are checked only once pixel boxes have a usable size)."""
    if not isinstance(data, dict):
        return [
            (
                f"a record must be a JSON object, got {type(data).__name__}",
                'write {"id": ..., "scene": ..., "objects": [...]}',
            )
        ]
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


def check_image_file(entry: str, path: str, width: int, height: int) -> list[tuple[str, str]]:
    """The file exists, is an image, is not cut short, and its real size is width x height (header only)."""
    if not os.path.isfile(path):
        return [
            (
                f"image {entry!r} not found at {path}",
                "check the entry; relative entries resolve against the image root (data.image_root, "
                "default: the JSONL file's directory), not the working directory",
            )
        ]
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            real, fmt = im.size, im.format
    except Image.DecompressionBombError as exc:
        return [
            (
                f"image {entry!r} at {path} is too large to decode safely: {exc}",
                "resize it offline (e.g. stage2 data convert --max-side 1024, docs/DATA.md)",
            )
        ]
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return [(f"image {entry!r} at {path} is not a readable image: {exc}", "replace it with a PNG or JPEG file")]
    if real != (width, height):
        return [
            (
                f"image {entry!r} is {real[0]}x{real[1]} pixels but the record says width={width}, height={height}",
                f"set width={real[0]}, height={real[1]} (boxes must refer to the real size)",
            )
        ]
    missing = _truncated(path, fmt)
    if missing:
        return [
            (
                f"image {entry!r} at {path} is truncated (no {missing} in its last {TAIL_BYTES} bytes): "
                "its header reads but decoding it in training would fail",
                "re-export or re-copy the file",
            )
        ]
    return []
