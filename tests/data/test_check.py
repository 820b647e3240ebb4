"""`stage2 data check`: every problem at once (file:line), then statistics; token lengths with a profile."""

from __future__ import annotations

import json

from _shared import heavy, stage2_in_fresh_python
from click.testing import CliRunner
from PIL import Image

from launchers.cli import main


def check(*args):
    return CliRunner().invoke(main, ["data", "check", *map(str, args)], catch_exceptions=False)


def image_rec(name, objects, size=(112, 112)):
    return {"images": [f"images/{name}"], "width": size[0], "height": size[1], "objects": objects}


def box(x1, y1, x2, y2, desc="cup"):
    return {"desc": desc, "bbox_2d": [x1, y1, x2, y2]}


def dataset(tmp_path, lines):
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (112, 112)).save(tmp_path / "images" / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_every_problem_is_listed_then_statistics_and_exit_1(tmp_path):
    bad = [{"scene": "s", "objects": [box(9, 9, 1, 1)]}] * 25  # more than RecordError's 20-line listing
    path = dataset(
        tmp_path,
        [
            image_rec("a.png", [box(0, 0, 10, 500), box(0, 0, 300, 300)]),
            image_rec("gone.png", []),
            image_rec("a.png", [], size=(96, 80)),
            *bad,
        ],
    )
    res = check(path)
    assert res.exit_code == 1
    out = res.output
    assert f"{path}:2: image 'images/gone.png' not found" in out and f"{path}:3: image 'images/a.png' is 112x112" in out
    assert f"{path}:28: objects[0].bbox_2d must have x1<=x2" in out  # the 25th bad line: nothing capped
    assert f"{path}: 1 valid record(s), 27 problem(s)" in out
    assert "images with problems:\n     missing: 1\n  wrong size: 1" in out
    assert "boxes under 20 bins: 1 (50.0%)" in out
    assert "         1-5: 1" in out


def test_clean_file_exits_0_with_histograms(tmp_path):
    objects = [box(i * 10, 0, i * 10 + 5, 5) for i in range(45)]
    path = dataset(tmp_path, [image_rec("a.png", objects), image_rec("a.png", [])])
    res = check(path)
    assert res.exit_code == 0, res.output
    assert "objects per record:\n           0: 1\n         1-5: 0" in res.output and "       41-60: 1" in res.output
    assert "boxes under 20 bins: 45 (100.0%)" in res.output and "         5-9: 45" in res.output


def test_profile_counts_answer_tokens_against_the_limits(tmp_path):
    objects = [box(i * 10, 0, i * 10 + 30, 40) for i in range(30)]
    path = dataset(tmp_path, [image_rec("a.png", objects), image_rec("a.png", objects[:1])])
    res = check(
        path,
        "--profile",
        "smoke/vlm_ab_mixed",
        "--set",
        "rollout_matching.max_new_tokens=64",
        "--set",
        "global_max_length=300",
    )
    assert res.exit_code == 0, res.output
    assert "answers over max_new_tokens=64 (rollouts truncated): 1" in res.output
    assert "prompt+answer over global_max_length=300 (Channel-A drops as too_long): 1" in res.output
    assert "answer tokens max: " in res.output


def test_image_records_on_a_text_profile_are_problems(tmp_path):
    path = dataset(tmp_path, [image_rec("a.png", [])])
    res = check(path, "--profile", "smoke/a_only")
    assert (
        res.exit_code == 1
        and f"{path}:1: record 'd.jsonl:1' has images but the model has no vision tower" in res.output
    )


def test_a_directory_is_a_clear_error(tmp_path):
    res = check(tmp_path)
    assert res.exit_code == 1 and "is a directory, not a JSONL records file" in res.stderr
    assert "Traceback" not in res.output


def test_data_commands_without_a_profile_import_nothing_heavy():
    runs = [["data", "--help"], ["data", "convert", "--help"], ["data", "check", "assets/vlm/data/val.jsonl"]]
    codes, modules = stage2_in_fresh_python(runs)
    assert codes == [0, 0, 0] and heavy(modules) == [] and "toolkit.data.check" in modules


def test_decode_finds_damage_inside_a_complete_image(tmp_path):
    """Bytes garbled mid-file, header and end marker intact: the load passes, --decode names the line."""
    path = dataset(tmp_path, [image_rec("a.png", []), image_rec("b.png", [])])
    Image.effect_noise((112, 112), 64).convert("RGB").save(tmp_path / "images" / "b.png")
    raw = bytearray((tmp_path / "images" / "b.png").read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(64)
    (tmp_path / "images" / "b.png").write_bytes(bytes(raw))
    assert check(path).exit_code == 0
    res = check(path, "--decode")
    assert (
        res.exit_code == 1
        and f"{path}:2: image 'images/b.png' at {tmp_path / 'images' / 'b.png'} does not decode" in res.output
    )
    assert "does not decode: 1" in res.output
