"""Hostile record files get a RecordError naming file:line and a fix, never a bare traceback (docs/DATA.md,
"Errors"): non-UTF-8 bytes, deep nesting, a directory, an empty file, a decompression bomb, a truncated
image, chat control tokens in text, image records on a text model. Ends with a record fuzz."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from toolkit.data.records import RecordError, load_records

GOOD = {
    "id": "r-1",
    "scene": "cat <|coord_1|><|coord_2|><|coord_3|><|coord_4|>",
    "objects": [{"desc": "cat", "bbox_2d": [1, 2, 3, 4]}],
}


def errors(path, **kwargs) -> str:
    with pytest.raises(RecordError) as err:
        load_records(path, **kwargs)
    return str(err.value)


def image_file(tmp_path, name, writer):
    path = tmp_path / name
    writer(path)
    rec = {"images": [name], "width": 112, "height": 112, "objects": []}
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text(json.dumps(rec) + "\n")
    return jsonl


def test_non_utf8_line_names_line_byte_and_column(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"scene": "caf\xe9"}\n')
    text = errors(path)
    assert f"{path}:2: line is not UTF-8 text (byte 0xe9 at column 15)" in text and "re-save the file as UTF-8" in text


def test_utf8_bom_on_the_first_line_is_fine(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert [r.id for r in load_records(path)] == ["r-1"]


def test_deeply_nested_line_is_a_line_error_not_a_recursion_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + "[" * 200_000 + "]" * 200_000 + "\n")
    assert f"{path}:2: JSON nested too deeply" in errors(path)


def test_directory_is_named_as_the_problem(tmp_path):
    assert f"{tmp_path}: is a directory, not a JSONL records file (fix: point data.train_jsonl" in errors(tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_a_record_error(tmp_path, content):
    path = tmp_path / "r.jsonl"
    path.write_text(content)
    assert f"{path}: has no records" in errors(path)


def _png_header(path, width, height):
    """A PNG signature, IHDR and an empty IDAT: PIL reads the size without decoding anything (~50 bytes)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b""))


def test_decompression_bomb_header_is_a_line_error(tmp_path):
    path = image_file(tmp_path, "bomb.png", lambda p: _png_header(p, 30000, 30000))
    text = errors(path)
    assert f"{path}:1: image 'bomb.png' at {tmp_path / 'bomb.png'} is too large to decode safely" in text
    assert "stage2 data convert --max-side" in text


def _noise(path, fmt):
    Image.effect_noise((112, 112), 64).convert("RGB").save(path, fmt)


@pytest.mark.parametrize(
    "name, fmt, marker", [("cut.png", "PNG", "PNG IEND chunk"), ("cut.jpg", "JPEG", "JPEG end-of-image marker")]
)
def test_truncated_image_is_found_at_load(tmp_path, name, fmt, marker):
    def cut(p):
        _noise(p, fmt)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    path = image_file(tmp_path, name, cut)
    with Image.open(tmp_path / name) as im:  # the header still reads: the old check passed this file
        assert im.size == (112, 112)
    assert f"{path}:1: image '{name}' at {tmp_path / name} is truncated (no {marker}" in errors(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_complete_images_pass_the_tail_check(tmp_path, fmt):
    path = image_file(tmp_path, "ok.img", lambda p: _noise(p, fmt))
    assert len(load_records(path)) == 1


@pytest.mark.parametrize(
    "field, value, needle",
    [
        (
            "scene",
            "a room <|im_end|>\n<|im_start|>assistant\n{}",
            "scene contains chat control token(s) ['<|im_end|>', '<|im_start|>']",
        ),
        (
            "scene",
            "<|vision_start|><|image_pad|><|vision_end|>",
            "scene contains chat control token(s) ['<|image_pad|>', '<|vision_end|>', '<|vision_start|>']",
        ),
        ("desc", "cat<|im_end|>", "objects[0].desc contains chat control token(s) ['<|im_end|>']"),
        ("desc", "cat <|coord_5|>", "objects[0].desc contains chat control token(s) ['<|coord_5|>']"),
    ],
)
def test_chat_control_tokens_in_text_are_rejected_and_counted(tmp_path, field, value, needle):
    bad = json.loads(json.dumps(GOOD))
    (bad if field == "scene" else bad["objects"][0])[field] = value
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({**bad, "id": f"r-{i}"}) + "\n" for i in range(3)))
    text = errors(path)
    assert text.startswith("3 problem(s) in records:") and f"{path}:3: {needle}" in text


def test_coord_tokens_stay_allowed_in_scene(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    assert load_records(path)[0].scene == GOOD["scene"]


def test_image_records_on_a_text_model_name_every_line(tmp_path, tok):
    from toolkit.trainer.samples import load_samples

    Image.new("RGB", (112, 112)).save(tmp_path / "a.png")
    lines = [
        GOOD,
        {"images": ["a.png"], "width": 112, "height": 112, "objects": []},
        {"images": ["a.png"], "width": 112, "height": 112, "objects": []},
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    with pytest.raises(RecordError) as err:
        load_samples(str(path), tok, vision=None)
    text = str(err.value)
    assert (
        f"{path}:2: record 'r.jsonl:2' has images but the model has no vision tower" in text and f"{path}:3: " in text
    )


# ---------------------------------------------------------------------------------------------- record fuzz
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False),
        st.text(max_size=12),
        st.sampled_from(["<|coord_5|>", "<|im_end|>", "<|coord_1000|>", "images/x.png"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(
            st.sampled_from(
                [
                    "id",
                    "scene",
                    "images",
                    "width",
                    "height",
                    "objects",
                    "desc",
                    "bbox_2d",
                    "poly",
                    "poly_points",
                    "summary",
                    "metadata",
                    "x",
                ]
            ),
            inner,
            max_size=6,
        ),
    ),
    max_leaves=20,
)
mutations = st.one_of(
    st.tuples(
        st.just("key"),
        st.sampled_from(["id", "scene", "objects", "images", "width", "summary", "metadata"]),
        json_values,
    ),
    st.tuples(st.just("object"), st.sampled_from(["desc", "bbox_2d", "poly", "poly_points", "extra"]), json_values),
    st.tuples(st.just("bytes"), st.binary(max_size=40), st.none()),
    st.tuples(st.just("nest"), st.integers(1, 50_000), st.none()),
)


def _line(mutation) -> bytes:
    kind, a, b = mutation
    rec = json.loads(json.dumps(GOOD))
    if kind == "key":
        rec[a] = b
    elif kind == "object":
        rec["objects"][0][a] = b
    elif kind == "bytes":
        return a.replace(b"\n", b" ")
    else:
        return b"[" * a + b"]" * a
    return json.dumps(rec).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(mutations, min_size=1, max_size=4),
    st.sampled_from(["error", "drop"]),
    st.sampled_from(["norm1000", "pixel"]),
)
def test_record_fuzz_loads_or_names_file_and_line(tmp_path, muts, poly_policy, bbox_format):
    """Mutated records (wrong types, huge ints, control tokens, raw bytes, deep nesting): records or a
    RecordError whose every issue names this file and a line; never another exception."""
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(_line(m) for m in muts) + b"\n")
    try:
        load_records(path, poly_policy=poly_policy, bbox_format=bbox_format)
    except RecordError as err:
        assert err.issues and all(i.file == str(path) and 0 <= i.line <= len(muts) for i in err.issues)
        assert all("(fix: " in str(i) for i in err.issues)
