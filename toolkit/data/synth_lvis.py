"""LVIS-shaped synthetic image records: many objects per image (up to 60), mostly small boxes, long answers.

The embedded VLM set has 1-3 large shapes per 112 px image; real LVIS scenes have dozens of objects, many
of them a few pixels wide, and answers of 1-2k tokens. This generator writes such scenes (overlapping
coloured rectangles and ellipses on 224 px-class canvases, sizes on the 28 px patch grid) so long answers,
big matching problems and long packs run on CPU (tests/e2e/test_data_inputs_e2e.py, docs/DATA.md).

    python -m toolkit.data.synth_lvis OUT_DIR [--n 16] [--seed 7]   # OUT_DIR/train.jsonl + OUT_DIR/images/
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from toolkit.data.coords import pixel_to_bin
from toolkit.data.records import dump_records
from toolkit.data.render import canonical_order

SIZES = ((224, 224), (280, 224), (224, 168))  # multiples of 28 (Qwen2-VL patch 14 x merge 2)
SHAPES = ("circle", "square")
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 170, 20)}
# Box side in pixels: (share of objects, low, high); on 224 px, 20 bins is about 4.5 px.
SIDE_MIX = ((0.6, 2, 8), (0.3, 9, 40), (0.1, 41, 120))


def _side(rng: random.Random) -> tuple[int, int]:
    r, acc = rng.random(), 0.0
    for share, lo, hi in SIDE_MIX:
        acc += share
        if r <= acc:
            return rng.randint(lo, hi), rng.randint(lo, hi)
    return SIDE_MIX[-1][1], SIDE_MIX[-1][2]


def make_scene(rng: random.Random, rid: str, n: int):
    """(record dict, PIL image) with n overlapping objects; boxes are bins of the pixel boxes."""
    from PIL import Image, ImageDraw

    width, height = rng.choice(SIZES)
    image = Image.new("RGB", (width, height), (240, 240, 235))
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(n):
        w, h = _side(rng)
        w, h = min(w, width), min(h, height)
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        (draw.ellipse if shape == "circle" else draw.rectangle)((x, y, x + w - 1, y + h - 1), fill=COLOURS[colour])
        bbox = [
            pixel_to_bin(x, width),
            pixel_to_bin(y, height),
            pixel_to_bin(x + w, width),
            pixel_to_bin(y + h, height),
        ]
        objects.append({"desc": f"{colour} {shape}", "bbox_2d": bbox})
    record = {
        "id": rid,
        "images": [f"images/{rid}.png"],
        "width": width,
        "height": height,
        "objects": canonical_order(objects),
    }
    return record, image


def write_lvis_like(
    out_dir: str | Path,
    n_images: int = 16,
    *,
    seed: int = 7,
    min_objects: int = 40,
    max_objects: int = 60,
    split: str = "train",
) -> Path:
    """Write `n_images` scenes to out_dir/images/ and out_dir/<split>.jsonl; returns the JSONL path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"lvis-synth-{seed}-{split}")
    records = []
    for i in range(n_images):
        record, image = make_scene(rng, f"{split}-{i + 1:06d}", rng.randint(min_objects, max_objects))
        image.save(out / record["images"][0], format="PNG")
        records.append(record)
    path = out / f"{split}.jsonl"
    dump_records(records, path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write LVIS-shaped synthetic image records.")
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=16, help="images per split")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    for split in ("train", "val"):
        print(write_lvis_like(args.out, args.n, seed=args.seed, split=split))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
