"""Eval pictures (toolkit/trainer/draw.py): the PNG is decoded and the box pixels are checked where the boxes are."""

from __future__ import annotations

import numpy as np
from PIL import Image

from toolkit.trainer.draw import FALSE_POSITIVE, MATCHED, MISSED, PictureLog, to_pixels, write_pngs

# One matched pair (pred 0 ↔ gt 0), one false positive (pred 1), one missed GT (gt 1), far apart.
RECORD = {
    "sample_id": "val/1",
    "gt": [{"desc": "dog", "bbox_2d": [100, 100, 300, 300]}, {"desc": "cat", "bbox_2d": [600, 600, 900, 900]}],
    "pred": [{"desc": "dog", "bbox_2d": [100, 100, 300, 300]}, {"desc": "ball", "bbox_2d": [600, 100, 900, 300]}],
    "match": {"pairs": [[0, 0, 1.0]], "fp": [1], "fn": [1]},
}


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def _near(px: np.ndarray, y: int, x: int, colour) -> bool:
    """`colour` within one pixel of (y, x) (PIL rounds a fractional edge either way)."""
    return any(tuple(px[j, i]) == colour for j in range(y - 1, y + 2) for i in range(x - 1, x + 2))


def _edges(px: np.ndarray, box, w: int, h: int, colour) -> list[bool]:
    """Is `colour` at the middle of each edge of a bin box?"""
    x1, y1, x2, y2 = (round(v) for v in to_pixels(box, w, h))
    mx, my = (x1 + x2) // 2, (y1 + y2) // 2
    return [_near(px, y1, mx, colour), _near(px, y2, mx, colour), _near(px, my, x1, colour), _near(px, my, x2, colour)]


def test_text_scene_is_drawn_on_a_1000_canvas_with_each_kind_in_its_colour(tmp_path):
    (path,) = write_pngs([RECORD], tmp_path)
    assert path.name == "val_1.png"
    px = _pixels(path)
    assert px.shape == (1000, 1000, 3)
    for box, colour in (
        ([100, 100, 300, 300], MATCHED),
        ([600, 100, 900, 300], FALSE_POSITIVE),
        ([600, 600, 900, 900], MISSED),
    ):
        assert _edges(px, box, 1000, 1000, colour) == [True] * 4, box
        cx, cy = (round(v) for v in to_pixels([(box[0] + box[2]) // 2, (box[1] + box[3]) // 2] * 2, 1000, 1000)[:2])
        assert tuple(px[cy, cx]) == (255, 255, 255)  # outlines only: the inside stays blank
    assert tuple(px[500, 500]) == (255, 255, 255) and tuple(px[50, 950]) == (255, 255, 255)


def test_image_record_is_drawn_on_its_image_at_the_scaled_place(tmp_path):
    image = tmp_path / "grey.png"
    Image.new("RGB", (400, 200), (128, 128, 128)).save(image)
    rec = dict(RECORD, images=[str(image)])
    (path,) = write_pngs([rec], tmp_path / "out")
    px = _pixels(path)
    assert px.shape == (200, 400, 3)  # the image's own size
    assert _edges(px, [600, 600, 900, 900], 400, 200, MISSED) == [True] * 4
    assert _edges(px, [600, 100, 900, 300], 400, 200, FALSE_POSITIVE) == [True] * 4
    assert _edges(px, [100, 100, 300, 300], 400, 200, MATCHED) == [True] * 4
    assert tuple(px[100, 200]) == (128, 128, 128) and tuple(px[195, 5]) == (128, 128, 128)  # the image itself


def test_picture_log_writes_pngs_beside_the_monitor_dumps_and_tensorboard_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    log = PictureLog(tmp_path / "run", tmp_path / "tb", tensorboard=True)
    paths = log.write(20, [RECORD])
    log.write(40, [RECORD])
    log.close()
    assert paths == [tmp_path / "run" / "monitor_dumps" / "eval_step_000020" / "val_1.png"]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={IMAGES: 0}).Reload()
    events = acc.Images("eval_pictures/val/1")
    assert [e.step for e in events] == [20, 40] and (events[0].width, events[0].height) == (1000, 1000)
