"""Matching benchmark: `match_boxes` on 60 predictions × 60 GT (the prod data's cap per image), with the
mask-IoU gate (pycocotools' polygon IoU), against the same Hungarian matching gated by box IoU, both measured in this
run (same machine, same load), interleaved and repeated; medians reported as a ratio.

    python bench/bench_match.py [--repeat 20]

The mask-IoU gate should add little to a Channel-B sample's parse → match → targets.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toolkit.rollout import match  # noqa: E402

KNOBS = dict(candidate_top_k=10, gate=0.3, resolution=256, fp_cost=1.0, fn_cost=1.0)


def scene(rng: np.random.Generator, n: int = 60) -> tuple[list, list]:
    """n GT boxes 4-200 bins wide and n predictions jittered around them (some far off)."""
    gts, preds = [], []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(4, 200, 2))
        x, y = int(rng.integers(0, 1000 - w)), int(rng.integers(0, 1000 - h))
        gts.append([x, y, x + w, y + h])
        d = rng.integers(-w // 3 - 1, w // 3 + 2, 4) if rng.random() < 0.8 else rng.integers(-300, 300, 4)
        p = np.clip(np.array(gts[-1]) + d, 0, 999)
        preds.append([int(min(p[0], p[2])), int(min(p[1], p[3])), int(max(p[0], p[2])), int(max(p[1], p[3]))])
    return preds, gts


def time_once(fn, scenes) -> float:
    start = time.perf_counter()
    for preds, gts in scenes:
        fn(preds, gts, **KNOBS)
    return (time.perf_counter() - start) / len(scenes)


def box_gated(preds, gts, **knobs):
    """Baseline: the same matching with the box IoU in place of the mask IoU (no rasterization)."""
    with mock.patch.object(match, "mask_iou_matrix", lambda p, g, r: match.box_iou_matrix(p, g)):
        return match.match_boxes(preds, gts, **knobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    scenes = [scene(rng) for _ in range(10)]
    variants = {"match_boxes (mask IoU gate)": match.match_boxes, "baseline (box IoU gate)": box_gated}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        time_once(fn, scenes)  # warm-up (imports, caches)
    for _ in range(args.repeat):  # interleaved, so machine load affects both alike
        for name, fn in variants.items():
            times[name].append(time_once(fn, scenes))
    medians = {name: statistics.median(v) for name, v in times.items()}
    for name, value in medians.items():
        print(f"{name:38s} median {value * 1000:8.2f} ms per 60×60 image")
    mask_s, box_s = medians.values()
    print(f"ratio mask / box = {mask_s / box_s:.2f}  (repeat={args.repeat}, 10 scenes of 60×60)")


if __name__ == "__main__":
    main()
