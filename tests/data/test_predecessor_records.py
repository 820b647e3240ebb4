"""The predecessor system's raw records load as they are (docs/DATA.md, "The predecessor's files"): no id
(derived from file and line), bins as integers or "<|coord_N|>" strings, summary/metadata accepted, and
poly objects by data.poly_policy (error names file:line; drop skips them and counts them)."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from toolkit.data.records import RecordError, load_records

COORD = ["<|coord_100|>", "<|coord_120|>", "<|coord_180|>", "<|coord_200|>"]
POLY = {"poly": [10, 10, 60, 10, 60, 80, 10, 80], "poly_points": 4, "desc": "mat"}


def write_predecessor(folder, lines, name="train.coord.jsonl"):
    """`lines` written byte for byte as the predecessor wrote them (images relative to the JSONL's folder)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(len(lines)):
        Image.new("RGB", (96, 64), (200, 200, 200)).save(folder / "images" / f"{i:04d}.jpg")
    path = folder / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def rec(i, objects, **extra):
    return {"images": [f"images/{i:04d}.jpg"], "objects": objects, "width": 96, "height": 64, **extra}


def test_the_documented_example_loads_with_ids_from_file_and_line(tmp_path):
    path = write_predecessor(
        tmp_path,
        [rec(0, [{"bbox_2d": COORD, "desc": "tool cabinet"}]), rec(1, [{"bbox_2d": [1, 2, 3, 4], "desc": "cup"}])],
    )
    a, b = load_records(path)
    assert (a.id, b.id) == ("train.coord.jsonl:1", "train.coord.jsonl:2")
    assert a.objects == ({"desc": "tool cabinet", "bbox_2d": [100, 120, 180, 200]},)
    assert b.objects == ({"desc": "cup", "bbox_2d": [1, 2, 3, 4]},)
    assert a.image_entries == ("images/0000.jpg",) and (a.width, a.height) == (96, 64)


def test_summary_and_metadata_are_accepted_and_not_written_back(tmp_path):
    path = write_predecessor(tmp_path, [rec(0, [], summary="an empty room", metadata={"source": "lvis", "k": [1]})])
    (r,) = load_records(path)
    assert "summary" not in r.as_json() and "metadata" not in r.as_json()


def test_poly_is_an_error_by_default_naming_file_line_and_the_policy(tmp_path):
    path = write_predecessor(tmp_path, [rec(0, [{"bbox_2d": COORD, "desc": "a"}]), rec(1, [POLY])])
    with pytest.raises(RecordError) as err:
        load_records(path)
    assert f"{path}:2: objects[0] is a poly" in str(err.value) and "data.poly_policy: drop" in str(err.value)


def test_poly_drop_skips_and_counts_per_record_and_logs_per_file(tmp_path, caplog):
    path = write_predecessor(tmp_path, [rec(0, [POLY, {"bbox_2d": COORD, "desc": "a"}, POLY]), rec(1, [POLY])])
    with caplog.at_level(logging.WARNING, logger="toolkit.data.records"):
        a, b = load_records(path, poly_policy="drop")
    assert [o["desc"] for o in a.objects] == ["a"] and b.objects == ()
    assert (a.dropped_poly, b.dropped_poly) == (2, 1)
    assert f"{path}: dropped 3 poly object(s) in 2 record(s)" in caplog.text


@pytest.mark.parametrize(
    "obj, needle",
    [
        ({**POLY, "poly": [1, 2, 3, 4]}, "even number (>= 6)"),
        ({**POLY, "poly": [1, 2, 3, 4, 5]}, "even number (>= 6)"),
        ({**POLY, "poly_points": 3}, "poly_points is 3 but poly has 4 points"),
        ({**POLY, "poly": [1, 2, 3, 4, 5, 1000]}, "outside 0..999"),
        ({**POLY, "bbox_2d": COORD}, "has both bbox_2d and poly"),
        ({"desc": "a", "poly_points": 3}, "poly_points is given without poly"),
        ({"desc": "a"}, "is missing bbox_2d"),
    ],
)
def test_malformed_poly_is_an_error_even_when_dropping(tmp_path, obj, needle):
    path = write_predecessor(tmp_path, [rec(0, [obj])])
    with pytest.raises(RecordError) as err:
        load_records(path, poly_policy="drop")
    assert f"{path}:1: objects[0]" in str(err.value) and needle in str(err.value)


def test_coord_strings_are_bins_not_pixels(tmp_path):
    path = write_predecessor(tmp_path, [rec(0, [{"bbox_2d": COORD, "desc": "a"}])])
    with pytest.raises(RecordError) as err:
        load_records(path, bbox_format="pixel")
    assert "coord tokens are bins" in str(err.value)


def test_explicit_and_derived_ids_still_must_be_unique(tmp_path):
    path = write_predecessor(tmp_path, [rec(0, [], id="train.coord.jsonl:2"), rec(1, [])])
    with pytest.raises(RecordError) as err:
        load_records(path)
    assert "duplicate id 'train.coord.jsonl:2' (first on line 1)" in str(err.value)


def test_the_prod_profile_data_keys_need_no_conversion_step():
    """prod profiles point at *.coord.jsonl with the defaults: bins (ints or coord strings), each file's folder."""
    from toolkit.config import load_profile

    d = load_profile("prod/ab_mixed", world_size=1).data
    assert d.train_jsonl.endswith(".coord.jsonl")
    assert (d.bbox_format, d.image_root, d.poly_policy) == ("norm1000", None, "error")
