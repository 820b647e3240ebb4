"""The record contract: valid lines load, every malformed line is reported as file:line with a fix."""

from __future__ import annotations

import json

import pytest

from toolkit.data.records import MAX_LISTED, Record, RecordError, dump_records, load_records

GOOD = {
    "id": "r-1",
    "scene": "cat <|coord_1|><|coord_2|><|coord_3|><|coord_4|>",
    "objects": [{"desc": "cat", "bbox_2d": [1, 2, 3, 4]}],
}


def write_lines(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return path


def with_(**changes):
    rec = json.loads(json.dumps(GOOD))
    rec.update(changes)
    return rec


def obj(**changes):
    o = {"desc": "cat", "bbox_2d": [1, 2, 3, 4]}
    o.update(changes)
    return o


def test_valid_file_loads_and_round_trips(tmp_path):
    recs = [Record("a", "s", ({"desc": "cat", "bbox_2d": [0, 0, 999, 999]},)), Record("b", "t", ())]
    path = tmp_path / "r.jsonl"
    dump_records(recs, path)
    assert load_records(path) == recs
    assert load_records(path, limit=1) == recs[:1]


def test_blank_lines_are_skipped(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [GOOD, "", with_(id="r-2")])
    assert [r.id for r in load_records(path)] == ["r-1", "r-2"]


@pytest.mark.parametrize(
    "line, needle",
    [
        ("{not json", "not valid JSON"),
        ('{"id": "a", "id": "b", "scene": "s", "objects": []}', "duplicate keys ['id']"),
        ([1, 2], "must be a JSON object"),
        ({"id": "a", "objects": []}, "missing required keys ['scene']"),
        (with_(id=""), "id must be a non-empty string"),
        (with_(scene=3), "scene must be a non-empty string"),
        (with_(objects={}), "objects must be a list"),
        (with_(extra=1), "unknown keys ['extra']"),
        (with_(images=["a.png"]), "both scene and images"),
        (with_(objects=[obj(bbox_2d=[1, 2, 3])]), "list of 4 integers"),
        (with_(objects=[obj(bbox_2d=[1.5, 2, 3, 4])]), "floats are not bins"),
        (with_(objects=[obj(bbox_2d=[True, 2, 3, 4])]), "must be integer bins or coord tokens"),
        (with_(objects=[obj(bbox_2d=["<|coord_1000|>", 2, 3, 4])]), "must be integer bins or coord tokens"),
        (with_(objects=[obj(bbox_2d=["12", 2, 3, 4])]), "must be integer bins or coord tokens"),
        (with_(objects=[obj(bbox_2d=["<|coord_9|>", 2, 3, 4])]), "x1<=x2 and y1<=y2"),
        (with_(summary=3), "summary must be a string"),
        (with_(metadata=[1]), "metadata must be a JSON object"),
        (with_(objects=[obj(bbox_2d=[0, 0, 1000, 5])]), "outside 0..999: [1000]"),
        (with_(objects=[obj(bbox_2d=[5, 0, 4, 9])]), "x1<=x2 and y1<=y2"),
        (with_(objects=[obj(desc="")]), "desc must be a non-empty string"),
        (with_(objects=[{"bbox_2d": [1, 2, 3, 4]}]), "objects[0] is missing desc"),
        (with_(objects=[obj(score=0.5)]), "objects[0] has unknown keys ['score']"),
        (with_(objects=["cat"]), "objects[0] must be an object"),
    ],
)
def test_each_problem_names_file_line_and_fix(tmp_path, line, needle):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, line])
    with pytest.raises(RecordError) as err:
        load_records(path)
    text = str(err.value)
    assert f"{path}:2: " in text
    assert needle in text
    assert "(fix: " in text
    assert all(issue.line == 2 for issue in err.value.issues)


def test_all_problems_are_listed_not_only_the_first(tmp_path):
    lines = [GOOD, "{oops", with_(id="r-3", objects=[obj(bbox_2d=[9, 9, 1, 1])]), GOOD]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(RecordError) as err:
        load_records(path)
    assert [i.line for i in err.value.issues] == [2, 3, 4]
    assert "duplicate id 'r-1' (first on line 1)" in str(err.value)


def test_listing_is_capped_with_a_count(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["{"] * (MAX_LISTED + 7))
    with pytest.raises(RecordError) as err:
        load_records(path)
    text = str(err.value)
    assert len(err.value.issues) == MAX_LISTED + 7
    assert f"{path}:{MAX_LISTED}:" in text and f"{path}:{MAX_LISTED + 1}:" not in text
    assert "... and 7 more problem(s) not listed" in text


def test_limit_stops_before_later_problems(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [GOOD, "{broken"])
    assert len(load_records(path, limit=1)) == 1


def test_committed_splits_load(assets_dir):
    train = load_records(assets_dir / "data" / "train.jsonl")
    val = load_records(assets_dir / "data" / "val.jsonl")
    assert len(val) == 128 and len(train) >= 1000
    assert {r.id for r in train}.isdisjoint(r.id for r in val)
    assert all(1 <= len(r.objects) <= 4 for r in train + val)
