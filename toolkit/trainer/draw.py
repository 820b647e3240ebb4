"""Pictures of one eval sample: GT and predicted boxes drawn with PIL's ImageDraw.

Colours: a matched prediction is green (its GT is drawn thin green underneath), a false positive is
red, a missed GT object is orange, each labelled with its desc (and the mask IoU for matches). Image
records are drawn on their (first) image; text scenes on a blank 1000×1000 canvas. Boxes are bins
0..999 (docs/DATA.md), mapped to pixels as bin / 999 × side.

`PictureLog` writes the pictures of a fixed handful of val samples at every eval: PNGs under
`<output_dir>/monitor_dumps/eval_step_000040/` (beside the monitor dumps) and TensorBoard images under
`eval_pictures/<sample_id>`, so the same images can be compared across steps. Imports PIL only;
TensorBoard is imported when a log is opened.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from toolkit.data.coords import bin_to_unit
from toolkit.runlayout import eval_pictures_dir

MATCHED = (0, 200, 0)
FALSE_POSITIVE = (230, 0, 0)
MISSED = (255, 150, 0)
CANVAS = 1000  # side of the blank canvas a text scene is drawn on
N_PICTURES = 4  # val samples drawn at each training eval (the first ones of rank 0's shard)


def to_pixels(bbox, width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = bbox
    return (
        bin_to_unit(x1) * (width - 1),
        bin_to_unit(y1) * (height - 1),
        bin_to_unit(x2) * (width - 1),
        bin_to_unit(y2) * (height - 1),
    )


def base_image(image_path: str | None) -> Image.Image:
    """The record's image (RGB copy), or a white 1000×1000 canvas for a text scene."""
    if image_path:
        with Image.open(image_path) as im:
            return im.convert("RGB")
    return Image.new("RGB", (CANVAS, CANVAS), "white")


def draw_boxes(record: dict, image_path: str | None = None) -> Image.Image:
    """Draw one prediction record (`gt`, `pred`, `match` as in predictions.jsonl) and return the picture."""
    im = base_image(image_path)
    draw = ImageDraw.Draw(im)
    w, h = im.size
    line = max(1, round(min(w, h) / 250))
    font = ImageFont.load_default(size=max(10, min(w, h) // 45))
    match = record["match"]
    matched_gt = {g for _, g, _ in match["pairs"]}
    for g, obj in enumerate(record["gt"]):
        if g in matched_gt:
            _box(draw, to_pixels(obj["bbox_2d"], w, h), MATCHED, 1, None, font)
    for g in match["fn"]:
        obj = record["gt"][g]
        _box(draw, to_pixels(obj["bbox_2d"], w, h), MISSED, line, f"missed: {obj['desc']}", font)
    for p, _, iou in match["pairs"]:
        obj = record["pred"][p]
        _box(draw, to_pixels(obj["bbox_2d"], w, h), MATCHED, line, f"{obj['desc']} {iou:.2f}", font)
    for p in match["fp"]:
        obj = record["pred"][p]
        _box(draw, to_pixels(obj["bbox_2d"], w, h), FALSE_POSITIVE, line, f"FP: {obj['desc']}", font)
    return im


def _box(draw: ImageDraw.ImageDraw, xy, colour, width: int, label: str | None, font) -> None:
    x1, y1, x2, y2 = xy
    draw.rectangle((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), outline=colour, width=width)
    if label:  # above the top-left corner when there is room, else just inside it
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        height = bottom - top + 2
        tx = min(x1, x2)
        ty = min(y1, y2) - height - width if min(y1, y2) - height - width >= 0 else min(y1, y2) + width + 1
        box = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), fill=(255, 255, 255))
        draw.text((tx, ty), label, fill=colour, font=font)


def file_name(sample_id: str) -> str:
    """A safe PNG name for a sample id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id) + ".png"


def write_pngs(records: list[dict], directory: str | os.PathLike) -> list[Path]:
    """One PNG per record in `directory`; returns the paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for rec in records:
        path = out / file_name(rec["sample_id"])
        draw_boxes(rec, (rec.get("images") or [None])[0]).save(path)
        paths.append(path)
    return paths


class PictureLog:
    """Rank 0's eval pictures: PNGs beside the monitor dumps and TensorBoard images (own event file)."""

    def __init__(self, output_dir: str | os.PathLike, logging_dir: str | os.PathLike, tensorboard: bool):
        self.output_dir = Path(output_dir)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.fspath(logging_dir), filename_suffix=".pictures")

    def write(self, step: int, records: list[dict]) -> list[Path]:
        import numpy as np

        paths = write_pngs(records, eval_pictures_dir(self.output_dir, step))
        if self._tb is not None:
            for rec, path in zip(records, paths):
                with Image.open(path) as im:
                    self._tb.add_image(
                        f"eval_pictures/{rec['sample_id']}",
                        np.asarray(im.convert("RGB")),
                        global_step=step,
                        dataformats="HWC",
                    )
            self._tb.flush()
        return paths

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
