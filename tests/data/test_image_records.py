"""The image-record contract: paths resolve against the dataset file (not the cwd), sizes are checked, pixel
boxes become bins, and every problem names the file line (docs/DATA.md, "Image records")."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from toolkit.data.coords import pixel_to_bin
from toolkit.data.records import Record, RecordError, dump_records, load_records

CIRCLE = {"desc": "circle", "bbox_2d": [100, 200, 300, 400]}


def image_rec(rid="im-1", entry="images/a.png", width=112, height=112, objects=(CIRCLE,), **extra):
    return {"id": rid, "images": [entry], "width": width, "height": height, "objects": list(objects), **extra}


def write_lines(path, lines):
    path.write_text("".join(json.dumps(ln) + "\n" for ln in lines), encoding="utf-8")
    return path


def save_png(path, size=(112, 112)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (255, 255, 255)).save(path)
    return path


@pytest.fixture
def dataset(tmp_path):
    """data/r.jsonl with one image record whose entry is relative to data/."""
    png = save_png(tmp_path / "data" / "images" / "a.png")
    return write_lines(tmp_path / "data" / "r.jsonl", [image_rec()]), png


def problems_of(path, **kwargs) -> RecordError:
    with pytest.raises(RecordError) as err:
        load_records(path, **kwargs)
    return err.value


def test_entries_resolve_against_the_jsonl_directory_not_the_cwd(dataset, tmp_path, monkeypatch):
    path, png = dataset
    elsewhere = tmp_path / "elsewhere"
    save_png(elsewhere / "images" / "a.png", (50, 50))  # a decoy the cwd would find (and the size check reject)
    monkeypatch.chdir(elsewhere)
    [rec] = load_records(path)
    assert rec.images == (str(png),) and rec.image_entries == ("images/a.png",)
    assert (rec.scene, rec.width, rec.height, rec.is_image) == ("", 112, 112, True)
    assert rec.objects == (CIRCLE,)


def test_relative_jsonl_path_is_resolved_once(dataset, tmp_path, monkeypatch):
    path, png = dataset
    monkeypatch.chdir(tmp_path)
    [rec] = load_records("data/r.jsonl")
    assert rec.images == (str(png),)


def test_relative_image_root_joins_the_jsonl_directory(tmp_path, monkeypatch):
    png = save_png(tmp_path / "data" / "pics" / "images" / "a.png")
    path = write_lines(tmp_path / "data" / "r.jsonl", [image_rec()])
    monkeypatch.chdir(tmp_path)  # a cwd-relative reading of "pics" would miss
    [rec] = load_records(path, image_root="pics")
    assert rec.images == (str(png),)


def test_absolute_image_root_and_absolute_entry(tmp_path):
    png = save_png(tmp_path / "store" / "images" / "a.png")
    other = save_png(tmp_path / "other.png")
    (tmp_path / "data").mkdir()
    path = write_lines(tmp_path / "data" / "r.jsonl", [image_rec(), image_rec("im-2", str(other))])
    a, b = load_records(path, image_root=tmp_path / "store")
    assert a.images == (str(png),)
    assert b.images == (str(other),) and b.image_entries == (str(other),)


def test_missing_image_names_line_entry_and_absolute_path(dataset, tmp_path):
    path, _ = dataset
    write_lines(path, [image_rec(), image_rec("im-2", "images/gone.png"), image_rec("im-3", "images/nope.png")])
    err = problems_of(path)
    missing = tmp_path / "data" / "images" / "gone.png"
    assert f"{path}:2: image 'images/gone.png' not found at {missing} (fix: " in str(err)
    assert [i.line for i in err.issues] == [2, 3]  # every problem of the file, not only the first


def test_size_mismatch_names_both_sizes(tmp_path):
    save_png(tmp_path / "images" / "a.png", (96, 80))
    path = write_lines(tmp_path / "r.jsonl", [image_rec()])
    [issue] = problems_of(path).issues
    assert issue.line == 1
    assert "is 96x80 pixels but the record says width=112, height=112" in issue.message
    assert "width=96, height=80" in issue.fix


def test_unreadable_image_is_reported(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    [issue] = problems_of(write_lines(tmp_path / "r.jsonl", [image_rec()])).issues
    assert "is not a readable image" in issue.message


@pytest.mark.parametrize(
    "line, needle",
    [
        ({**image_rec(), "scene": "a cat"}, "both scene and images"),
        ({"id": "x", "objects": []}, "missing required keys ['scene'] or ['images']"),
        ({"id": "x", "scene": "s", "width": 5, "objects": []}, "keys ['width'] belong to image records"),
        ({k: v for k, v in image_rec().items() if k != "height"}, "missing required keys ['height']"),
        (image_rec(width=0), "width must be a positive integer"),
        (image_rec(height=11.5), "height must be a positive integer"),
        ({**image_rec(), "images": []}, "exactly one non-empty path"),
        ({**image_rec(), "images": ["a.png", "b.png"]}, "exactly one non-empty path"),
        (image_rec(objects=[{"desc": "circle", "bbox_2d": [1.5, 2, 3, 4]}]), "floats are not bins"),
    ],
)
def test_shape_problems_name_the_line(dataset, line, needle):
    path, _ = dataset
    write_lines(path, [image_rec(), line])
    err = problems_of(path)
    assert needle in str(err) and all(i.line == 2 for i in err.issues)


def test_pixel_boxes_become_bins(tmp_path):
    save_png(tmp_path / "images" / "a.png", (200, 100))
    pix = [{"desc": "square", "bbox_2d": [0, 10.5, 200, 50]}]
    path = write_lines(tmp_path / "r.jsonl", [image_rec(width=200, height=100, objects=pix)])
    [rec] = load_records(path, bbox_format="pixel")
    assert rec.objects[0]["bbox_2d"] == [0, pixel_to_bin(10.5, 100), 999, 500] == [0, 105, 999, 500]


@pytest.mark.parametrize(
    "bbox, needle",
    [
        ([0, 0, 201, 50], "outside the 200x100 image"),
        ([0, -1, 10, 50], "outside the 200x100 image"),
        ([50, 0, 10, 50], "x1<=x2 and y1<=y2"),
        ([0, 0, "10", 50], "4 pixel numbers"),
    ],
)
def test_pixel_box_problems(tmp_path, bbox, needle):
    save_png(tmp_path / "images" / "a.png", (200, 100))
    path = write_lines(
        tmp_path / "r.jsonl", [image_rec(width=200, height=100, objects=[{"desc": "c", "bbox_2d": bbox}])]
    )
    assert needle in str(problems_of(path, bbox_format="pixel"))


def test_pixel_format_needs_a_size(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [{"id": "t", "scene": "s", "objects": [CIRCLE]}])
    assert "bbox_format 'pixel' needs width and height" in str(problems_of(path, bbox_format="pixel"))
    with pytest.raises(ValueError, match="bbox_format must be one of"):
        load_records(path, bbox_format="pixels")


def test_round_trip_keeps_entries_relative_and_boxes_in_bins(tmp_path):
    save_png(tmp_path / "images" / "a.png", (200, 100))
    src = write_lines(
        tmp_path / "src.jsonl", [image_rec(width=200, height=100, objects=[{"desc": "c", "bbox_2d": [0, 0, 100, 100]}])]
    )
    loaded = load_records(src, bbox_format="pixel")
    out = tmp_path / "out.jsonl"
    dump_records(loaded, out)
    assert json.loads(out.read_text()) == {
        "id": "im-1",
        "images": ["images/a.png"],
        "width": 200,
        "height": 100,
        "objects": [{"desc": "c", "bbox_2d": [0, 0, 500, 999]}],
    }
    assert load_records(out) == loaded  # the dumped file is norm1000


def test_text_and_image_records_mix_in_one_file(dataset):
    path, _ = dataset
    write_lines(path, [image_rec(), {"id": "t", "scene": "s", "objects": []}])
    loaded = load_records(path)
    assert [r.is_image for r in loaded] == [True, False]
    assert loaded[1] == Record("t", "s", ()) and loaded[1].as_json() == {"id": "t", "scene": "s", "objects": []}
    dump_records(loaded, path)
    assert load_records(path) == loaded


def test_limit_stops_before_a_missing_image(dataset):
    path, _ = dataset
    write_lines(path, [image_rec(), image_rec("im-2", "images/gone.png")])
    assert [r.id for r in load_records(path, limit=1)] == ["im-1"]
