"""`stage2 data convert`: COCO/LVIS annotations -> image records that load (docs/DATA.md, "COCO and LVIS")."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from launchers.cli import main
from toolkit.data.convert import fit_size, model_grid
from toolkit.data.coords import pixel_to_bin
from toolkit.data.records import load_records


def coco_fixture(tmp_path, lvis=False):
    """Four images: one with 3 boxes (+ a crowd and a zero-width one), one with 4, one without objects, one missing
    on disk."""
    img = tmp_path / "imgs"
    img.mkdir()
    sizes = {1: (200, 100), 2: (64, 64), 3: (64, 64), 4: (64, 64)}
    for i in (1, 2, 3):
        Image.new("RGB", sizes[i], (30, 60, 90)).save(img / f"{i:012d}.jpg", quality=95)
    name = (
        (lambda i: {"coco_url": f"http://images.cocodataset.org/val2017/{i:012d}.jpg"})
        if lvis
        else (lambda i: {"file_name": f"{i:012d}.jpg"})
    )
    images = [{"id": i, "width": w, "height": h, **name(i)} for i, (w, h) in sizes.items()]
    cats = [
        {"id": 7, "name": "tool_cabinet", **({"synonyms": ["tool_cabinet"]} if lvis else {})},
        {"id": 9, "name": "cup", **({"synonyms": ["cup"]} if lvis else {})},
    ]

    def ann(k, image_id, bbox, cat=9, crowd=0):
        return {
            "id": k,
            "image_id": image_id,
            "category_id": cat,
            "bbox": bbox,
            "area": bbox[2] * bbox[3],
            **({} if lvis else {"iscrowd": crowd}),
        }

    anns = [
        ann(1, 1, [100, 50, 50, 40], 7),
        ann(2, 1, [10, 10, 30.5, 20]),
        ann(3, 1, [0, 10, 5, 5]),
        ann(4, 1, [5, 5, 0, 10]),  # zero width: dropped
        ann(5, 2, [1, 1, 5, 5]),
        ann(6, 2, [2, 2, 5, 5]),
        ann(7, 2, [3, 3, 5, 5]),
        ann(10, 2, [4, 4, 5, 5]),
        ann(8, 4, [1, 1, 5, 5]),
    ]
    if not lvis:
        anns.append(ann(9, 1, [0, 0, 200, 100], crowd=1))
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, img


def run(*args):
    return CliRunner().invoke(main, ["data", "convert", "--no-progress", *map(str, args)], catch_exceptions=False)


@pytest.mark.parametrize("lvis", [False, True])
def test_coco_and_lvis_convert_to_records_that_load(tmp_path, lvis):
    ann, img = coco_fixture(tmp_path, lvis)
    out = tmp_path / "out" / "train.jsonl"
    res = run("--coco", ann, "--images", img, "--out", out, "--max-objects", 3)
    assert res.exit_code == 0, res.output
    (rec,) = load_records(out)
    prefix = "lvis" if lvis else "coco"
    assert rec.id == f"{prefix}-1" and (rec.width, rec.height) == (200, 100)
    assert rec.image_entries == ("../imgs/000000000001.jpg",)

    def bins(x, y, w, h):
        return [
            pixel_to_bin(x, 200),
            pixel_to_bin(y, 100),
            pixel_to_bin(x + w, 200),
            pixel_to_bin(y + h, 100),
        ]

    assert list(rec.objects) == [  # sorted by (minY, minX); LVIS underscores become spaces; crowd dropped
        {"desc": "cup", "bbox_2d": bins(0, 10, 5, 5)},
        {"desc": "cup", "bbox_2d": bins(10, 10, 30.5, 20)},
        {"desc": "tool cabinet", "bbox_2d": bins(100, 50, 50, 40)},
    ]
    err = res.stderr
    assert "records written: 1" in err and "images skipped (over --max-objects 3): 1" in err
    assert "objects dropped (zero width or height): 1" in err and "images skipped (no objects): 1" in err
    assert "images skipped (image missing or unreadable): 1" in err
    assert ("objects dropped (crowd): 1" in err) != lvis


def test_images_over_the_cap_are_skipped_not_cut(tmp_path):
    ann, img = coco_fixture(tmp_path)
    out = tmp_path / "r.jsonl"
    res = run("--coco", ann, "--images", img, "--out", out, "--max-objects", 2)
    assert "images skipped (over --max-objects 2): 2" in res.stderr  # image 1 (3 boxes) and image 2 (4 boxes)
    assert out.read_text() == ""


def test_crowd_boxes_can_be_kept_and_empty_images_too(tmp_path):
    ann, img = coco_fixture(tmp_path)
    out = tmp_path / "r.jsonl"
    run("--coco", ann, "--images", img, "--out", out, "--iscrowd", "keep", "--keep-empty", "--max-objects", 60)
    recs = load_records(out)
    assert (
        [r.id for r in recs] == ["coco-1", "coco-2", "coco-3"] and len(recs[0].objects) == 4 and recs[2].objects == ()
    )


def test_max_side_resizes_on_the_patch_grid_beside_the_output(tmp_path):
    ann, img = coco_fixture(tmp_path)
    out = tmp_path / "out" / "r.jsonl"
    res = run("--coco", ann, "--images", img, "--out", out, "--max-side", 64, "--grid", 28)
    assert res.exit_code == 0 and "images resized: 2" in res.stderr
    first = load_records(out)[0]
    assert first.image_entries == ("images/000000000001.jpg",) and (first.width, first.height) == (56, 28)
    with Image.open(tmp_path / "out" / "images" / "000000000001.jpg") as im:
        assert im.size == (56, 28)
    assert first.objects[0]["bbox_2d"] == [0, 100, 25, 150]  # bins are fractions of the side: unchanged


@pytest.mark.parametrize(
    "size, max_side, grid, want",
    [
        ((640, 480), 512, 32, (512, 384)),
        ((100, 60), 512, 28, (112, 56)),
        ((3000, 20), 1024, 28, (1008, 28)),
        ((1024, 1024), 1024, 32, (1024, 1024)),
        ((1030, 700), 1024, 28, (1008, 700 * 1024 // 1030 // 28 * 28 + 28)),
    ],
)
def test_fit_size_stays_on_the_grid_and_under_max_side(size, max_side, grid, want):
    got = fit_size(*size, max_side, grid)
    assert got == want and all(s % grid == 0 and s <= max_side for s in got)


def test_grid_from_the_model_folder(assets_dir):
    assert model_grid(assets_dir / "vlm" / "stage1") == 28


def test_malformed_annotations_name_the_entry(tmp_path):
    ann = tmp_path / "bad.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "width": 5}],
                "categories": [{"id": 1, "name": "a"}],
                "annotations": [
                    {"image_id": 1, "category_id": 1, "bbox": [1, 2, "x", 4]},
                    {"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4]},
                ],
            }
        )
    )
    res = CliRunner().invoke(
        main, ["data", "convert", "--coco", str(ann), "--images", str(tmp_path), "--out", str(tmp_path / "o.jsonl")]
    )
    assert res.exit_code == 1
    for needle in (
        "3 malformed entries",
        "images[0] needs id and positive integer width, height",
        "annotations[0].bbox must be [x, y, w, h]",
        "annotations[1] needs image_id and a category_id",
    ):
        assert needle in res.stderr
