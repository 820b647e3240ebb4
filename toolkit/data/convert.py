"""COCO / LVIS detection annotations -> image records (docs/DATA.md, "COCO and LVIS").

`convert_coco(annotations, images_dir, out)` writes one image record per kept image: `bbox_2d` bins from COCO's
`[x, y, w, h]` pixels, the category name as `desc` (underscores become spaces: LVIS writes "tool_cabinet"),
objects sorted by (minY, minX). Choices (counted in the summary, never silent):

- crowd boxes (`iscrowd: 1`) are dropped by default (`iscrowd="keep"` keeps them as plain boxes);
- images with more than `max_objects` objects are skipped, not cut: a truncated ground truth would teach the
  model to stop listing early, and Channel-B would punish its correct extra detections as false positives;
- images without objects are skipped unless `keep_empty` (LVIS labels are federated: an image with no
  annotations says little about what is absent);
- boxes of zero width or height are dropped;
- images missing from `images_dir`, or whose real size differs from the annotation, are skipped.

With `max_side`, images are resized offline so the long side is at most `max_side` pixels and both sides are
multiples of the model's patch grid (patch_size x merge_size: 28 for Qwen2-VL, 32 for Qwen3-VL), written to
`<out folder>/images/`. Bins are fractions of the side, so they stay valid for the resized image; only the
record's width and height change. Reads plain JSON (COCO and LVIS files are JSON); PIL for images.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.data.coords import pixel_to_bin
from toolkit.data.records import dump_records

CROWD_CHOICES = ("drop", "keep")
DEFAULT_GRID = 32  # Qwen3-VL: patch 16 x merge 2 (the prod model); Qwen2-VL: 14 x 2 = 28


class ConvertError(ValueError):
    """The annotation file is not a COCO/LVIS detection file (names the file and the key)."""


@dataclass
class ConvertSummary:
    images: int = 0
    written: int = 0
    objects: int = 0
    resized: int = 0
    skipped: dict = field(default_factory=lambda: defaultdict(int))  # reason -> images
    dropped: dict = field(default_factory=lambda: defaultdict(int))  # reason -> objects
    examples: list = field(default_factory=list)  # a few skipped images, for the report

    def skip(self, reason: str, example: str | None = None) -> None:
        self.skipped[reason] += 1
        if example and len(self.examples) < 5:
            self.examples.append(f"{reason}: {example}")

    def lines(self) -> list[str]:
        out = [
            f"images in annotations: {self.images}",
            f"records written: {self.written}",
            f"objects written: {self.objects}",
            f"images resized: {self.resized}",
        ]
        out += [f"images skipped ({reason}): {n}" for reason, n in sorted(self.skipped.items())]
        out += [f"objects dropped ({reason}): {n}" for reason, n in sorted(self.dropped.items())]
        return out + [f"  e.g. {e}" for e in self.examples]


def model_grid(model_dir: str | Path) -> int:
    """patch_size x merge_size of a Qwen-VL folder (preprocessor_config.json or processor_config.json)."""
    folder = Path(model_dir)
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            cfg = json.loads(path.read_text(encoding="utf-8"))
            cfg = cfg.get("image_processor", cfg)
            if "patch_size" in cfg:
                return int(cfg["patch_size"]) * int(cfg.get("merge_size", 1))
    raise ConvertError(
        f"{folder}: no patch_size in preprocessor_config.json or processor_config.json "
        "(fix: give --grid, e.g. 28 for Qwen2-VL, 32 for Qwen3-VL)"
    )


def fit_size(width: int, height: int, max_side: int, grid: int) -> tuple[int, int]:
    """(w, h) with the long side <= max_side, both multiples of `grid`, aspect kept as closely as the grid allows.

    >>> fit_size(640, 480, 512, 32), fit_size(100, 60, 512, 28)
    ((512, 384), (112, 56))
    """
    scale = min(1.0, max_side / max(width, height))
    top = max(grid, max_side // grid * grid)

    def side(v: float) -> int:
        return min(top, max(grid, round(v * scale / grid) * grid))

    return side(width), side(height)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConvertError(f"{path}: cannot read the annotations: {exc} (fix: give a COCO/LVIS JSON file)") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ConvertError(
                f"{path}: no '{key}' list: not a COCO/LVIS detection file "
                "(fix: give instances_*.json or lvis_v1_*.json)"
            )
    problems = _problems(data)
    if problems:
        more = f"\n... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConvertError(f"{path}: {len(problems)} malformed entries:\n" + "\n".join(problems[:10]) + more)
    return data


def _problems(data: dict) -> list[str]:
    """The shape COCO/LVIS promise, checked up front so a bad entry is named, not a KeyError later."""

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    cats = {c.get("id") for c in data["categories"] if isinstance(c, dict) and "name" in c}
    problems = [
        f"categories[{k}] needs id and name"
        for k, c in enumerate(data["categories"])
        if not isinstance(c, dict) or "id" not in c or "name" not in c
    ]
    for k, im in enumerate(data["images"]):
        if (
            not isinstance(im, dict)
            or "id" not in im
            or not all(isinstance(im.get(key), int) and im[key] > 0 for key in ("width", "height"))
        ):
            problems.append(f"images[{k}] needs id and positive integer width, height")
    for k, ann in enumerate(data["annotations"]):
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(number(v) for v in bbox):
            problems.append(f"annotations[{k}].bbox must be [x, y, w, h] pixels, got {bbox!r}")
        elif ann.get("category_id") not in cats or "image_id" not in ann:
            problems.append(f"annotations[{k}] needs image_id and a category_id listed in categories")
    return problems


def _file_name(image: dict) -> str:
    """COCO has file_name; LVIS has only coco_url (".../train2017/000000391895.jpg": the basename)."""
    return image.get("file_name") or os.path.basename(image.get("coco_url", ""))


def _objects(
    anns: list[dict], names: dict, width: int, height: int, iscrowd: str, summary: ConvertSummary
) -> list[dict]:
    out = []
    for ann in anns:
        if ann.get("iscrowd", 0) and iscrowd == "drop":
            summary.dropped["crowd"] += 1
            continue
        x, y, w, h = ann["bbox"]
        x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
        if x2 <= x1 or y2 <= y1:
            summary.dropped["zero width or height"] += 1
            continue
        bins = [pixel_to_bin(x1, width), pixel_to_bin(y1, height), pixel_to_bin(x2, width), pixel_to_bin(y2, height)]
        out.append({"desc": names[ann["category_id"]], "bbox_2d": bins})
    return sorted(out, key=lambda o: (o["bbox_2d"][1], o["bbox_2d"][0]))  # (minY, minX), as the predecessor


def _real_size(path: Path) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _resize(src: Path, dst: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        im.save(dst, quality=95) if dst.suffix.lower() in (".jpg", ".jpeg") else im.save(dst)


def _record(
    image: dict,
    objects: list[dict],
    images_dir: Path,
    out_dir: Path,
    max_side: int | None,
    grid: int,
    prefix: str,
    summary: ConvertSummary,
) -> dict | None:
    name = _file_name(image)
    src = images_dir / name
    width, height = image.get("width"), image.get("height")
    real = _real_size(src) if name and src.is_file() else None
    if real is None:
        summary.skip("image missing or unreadable", str(src))
        return None
    if real != (width, height):
        summary.skip(
            "real size differs from the annotation", f"{src} is {real[0]}x{real[1]}, annotated {width}x{height}"
        )
        return None
    entry = os.path.relpath(src, out_dir)
    if max_side:
        size = fit_size(width, height, max_side, grid)
        if size != (width, height):
            entry = f"images/{name}"
            _resize(src, out_dir / entry, size)
            width, height = size
            summary.resized += 1
    return {"id": f"{prefix}-{image['id']}", "images": [entry], "width": width, "height": height, "objects": objects}


def convert_coco(
    annotations: str | Path,
    images_dir: str | Path,
    out: str | Path,
    *,
    max_objects: int = 60,
    max_side: int | None = None,
    grid: int = DEFAULT_GRID,
    iscrowd: str = "drop",
    keep_empty: bool = False,
    progress: bool = False,
) -> ConvertSummary:
    """Convert a COCO or LVIS detection file to image records at `out` (see the module docstring)."""
    if iscrowd not in CROWD_CHOICES:
        raise ValueError(f"iscrowd must be one of {CROWD_CHOICES}, got {iscrowd!r}")
    ann_path, images_dir, out = Path(annotations), Path(images_dir).resolve(), Path(out).resolve()
    data = _read(ann_path)
    is_lvis = any("synonyms" in c for c in data["categories"])
    names = {c["id"]: str(c["name"]).replace("_", " ") for c in data["categories"]}
    by_image = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = ConvertSummary(images=len(data["images"]))
    records = []
    from tqdm import tqdm

    images = sorted(data["images"], key=lambda im: im["id"])
    for image in tqdm(images, desc="convert", unit="image", disable=not progress):
        objects = _objects(by_image.get(image["id"], []), names, image["width"], image["height"], iscrowd, summary)
        if len(objects) > max_objects:
            summary.skip(f"over --max-objects {max_objects}")
            continue
        if not objects and not keep_empty:
            summary.skip("no objects")
            continue
        rec = _record(image, objects, images_dir, out.parent, max_side, grid, "lvis" if is_lvis else "coco", summary)
        if rec is not None:
            records.append(rec)
            summary.objects += len(objects)
    dump_records(records, out)
    summary.written = len(records)
    return summary
