"""The embedded VLM assets (assets/vlm/): byte-identical rebuilds, image records that follow the contract, a
model folder that loads and runs with an image without torchvision, and a Stage-1 that answers in JSON."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from _shared import child_env

from toolkit.data.records import load_records
from toolkit.data.render import SYSTEM_PROMPT, USER_INSTRUCTION, canonical_order

SHAPES = {"circle", "square", "triangle"}
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def vlm_dir(assets_dir) -> Path:
    return assets_dir / "vlm"


def test_fast_vlm_parts_rebuild_byte_identical(assets_dir, vlm_dir, tmp_path):
    env = child_env()
    subprocess.run(
        [
            sys.executable,
            str(assets_dir / "build_assets.py"),
            "--out",
            str(tmp_path),
            "--only",
            "tokenizer,vlm_data,vlm_model",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    for part in ("data", "tiny_qwen2_vl"):
        fresh, committed = digests(tmp_path / "vlm" / part), digests(vlm_dir / part)
        assert fresh.keys() == committed.keys(), part
        assert fresh == committed, f"{part}: {[k for k in fresh if fresh[k] != committed[k]][:5]} differ"


def test_vlm_folder_stays_small(vlm_dir):
    # 3.5 MiB for Qwen2-VL + data, 6.4 MiB for the tiny Qwen2.5-VL and Qwen3-VL init + Stage-1 folders
    assert sum(p.stat().st_size for p in vlm_dir.rglob("*") if p.is_file()) < 12 * 2**20


@pytest.mark.parametrize("split, count", [("train", 1000), ("val", 64)])
def test_image_records_follow_the_contract(vlm_dir, tmp_path, monkeypatch, split, count):
    monkeypatch.chdir(tmp_path)  # image entries must resolve against the data folder, not the cwd
    records = load_records(vlm_dir / "data" / f"{split}.jsonl")  # checks every file exists and is 112x112
    assert len(records) == count
    assert all(r.is_image and (r.width, r.height) == (112, 112) for r in records)
    assert all(Path(r.images[0]).parent == (vlm_dir / "data" / "images").resolve() for r in records)
    assert {len(r.objects) for r in records} == {1, 2, 3}
    for r in records:
        assert list(r.objects) == canonical_order(r.objects), r.id
        assert all(o["desc"] in SHAPES for o in r.objects), r.id
        assert all(x1 < x2 and y1 < y2 for x1, y1, x2, y2 in (o["bbox_2d"] for o in r.objects)), r.id


@pytest.fixture(scope="module")
def processor(vlm_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(vlm_dir / "tiny_qwen2_vl"), trust_remote_code=True)


def test_tokenizer_is_the_literal_one_plus_vision_tokens(vlm_dir, tok, processor):
    from toolkit.data.tokenizer import load_tokenizer

    vlm_tok = load_tokenizer(vlm_dir / "tiny_qwen2_vl")
    assert vlm_tok.convert_tokens_to_ids(VISION_TOKENS) == [1319, 1320, 1321, 1322]
    assert vlm_tok.convert_tokens_to_ids(["<|coord_0|>", "<|coord_999|>"]) == [319, 1318]
    text = '{"object_1": {"desc": "circle", "bbox_2d": ["<|coord_9|>", "<|coord_54|>"]}}<|im_end|>'
    assert vlm_tok.encode(text) == tok.encode(text) == processor.tokenizer.encode(text)


def encode_one(processor, record):
    from toolkit.vlm.images import IMAGE_PLACEHOLDER, open_image

    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": IMAGE_PLACEHOLDER + USER_INSTRUCTION},
    ]
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=[open_image(record.images[0])], return_tensors="pt")


def run_model(folder: Path, enc, new_tokens: int):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.set_num_threads(1)
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(folder)).eval()
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")}
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens)
    return model, logits, out[0, enc["input_ids"].shape[1] :].tolist()


def test_processor_and_model_run_with_an_image(vlm_dir, processor):
    import torch

    assert type(processor).__name__ == "ImageOnlyQwen2VLProcessor"
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"  # the PIL backend
    [record] = load_records(vlm_dir / "data" / "val.jsonl", limit=1)
    enc = encode_one(processor, record)
    pads = enc["input_ids"] == 1321
    assert int(pads.sum()) == 16 and tuple(enc["image_grid_thw"][0].tolist()) == (1, 8, 8)
    assert torch.equal(enc["mm_token_type_ids"].bool(), pads)
    model, logits, new = run_model(vlm_dir / "tiny_qwen2_vl", enc, 4)
    assert model.config.tie_word_embeddings is False and model.dtype == torch.float32
    assert logits.shape == (1, enc["input_ids"].shape[1], 1323) and torch.isfinite(logits).all()
    assert len(new) == 4


def test_stage1_answers_val_images_in_json(vlm_dir, processor):
    folder = vlm_dir / "stage1"
    if not folder.exists():
        pytest.skip("assets/vlm/stage1 is not built")
    assert digests(vlm_dir / "tiny_qwen2_vl").keys() - {"model.safetensors"} <= digests(folder).keys()
    for record in load_records(vlm_dir / "data" / "val.jsonl", limit=2):
        enc = encode_one(processor, record)
        _, _, new = run_model(folder, enc, 70)
        assert 2 in new, f"{record.id}: no <|im_end|> within 70 tokens"
        text = processor.tokenizer.decode(new[: new.index(2)], skip_special_tokens=False)
        assert text.startswith('{"object_1": {"desc": "') and isinstance(json.loads(text), dict), record.id
    rows = [json.loads(ln) for ln in (folder / "training_curve.jsonl").read_text().splitlines()]
    assert {"step", "loss", "valid_parse", "f1"} <= rows[-1].keys() and rows[-1]["valid_parse"] >= 0.9


@pytest.mark.slow
def test_vlm_stage1_smoke_builds_are_byte_identical(assets_dir, tmp_path):
    env = child_env()
    for out in (tmp_path / "a", tmp_path / "b"):
        subprocess.run(
            [
                sys.executable,
                str(assets_dir / "build_assets.py"),
                "--out",
                str(out),
                "--only",
                "tokenizer,vlm_data,vlm_model,vlm_stage1",
                "--vlm-stage1-steps",
                "20",
            ],
            check=True,
            env=env,
            capture_output=True,
            timeout=900,
        )
    assert digests(tmp_path / "a" / "vlm" / "stage1") == digests(tmp_path / "b" / "vlm" / "stage1")
