"""The tiny Qwen2.5-VL and Qwen3-VL folders (assets/vlm_families.py): byte-identical rebuilds of the
init folders, the architecture features they exist for, and Stage-1 curves that reach valid JSON."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from _shared import child_env
from _vlm_families import NEW_FAMILIES, ROOT, family_dir


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def build(out: Path, *parts: str, steps: int | None = None) -> None:
    env = child_env()
    extra = ["--vlm-stage1-steps", str(steps)] if steps is not None else []
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "assets" / "build_assets.py"),
            "--out",
            str(out),
            "--only",
            ",".join(parts),
            *extra,
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=1800,
    )


def test_init_folders_rebuild_byte_identical(tmp_path):
    build(tmp_path, "tokenizer", *(f"{f}_model" for f in NEW_FAMILIES))
    for family in NEW_FAMILIES:
        fresh, committed = digests(tmp_path / "vlm" / family_dir(family).name), digests(family_dir(family))
        assert fresh == committed, f"{family}: {[k for k in fresh if fresh.get(k) != committed.get(k)]} differ"


def test_configs_carry_the_family_features():
    q25 = json.loads((family_dir("qwen2_5_vl") / "config.json").read_text())
    assert q25["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert q25["vision_config"]["fullatt_block_indexes"] == [1] and q25["vision_config"]["window_size"] == 56
    q3 = json.loads((family_dir("qwen3_vl") / "config.json").read_text())
    assert q3["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert q3["vision_config"]["deepstack_visual_indexes"] == [0, 1] and q3["vision_config"]["patch_size"] == 16
    assert q3["text_config"]["rope_parameters"]["mrope_interleaved"] is True
    for cfg in (q25, q3):
        assert cfg["tie_word_embeddings"] is False and cfg["image_token_id"] == 1321


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_stage1_curve_reaches_valid_json(family):
    rows = [
        json.loads(line) for line in (family_dir(family, stage1=True) / "training_curve.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["step"] == 300 and rows[-1]["valid_parse"] >= 0.9
    assert rows[0]["loss"] > rows[-1]["loss"]


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_processor_loads_image_only_and_gives_16_image_tokens(family):
    from toolkit.vlm.inputs import VisionProcessor

    vision = VisionProcessor(family_dir(family, stage1=True))  # AutoProcessor + the folder's remote code
    assert type(vision.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    grid = vision.grid_for_size(112, 112)
    assert vision.tokens_per_image(grid) == 16


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_short_stage1_rebuild_is_byte_identical(tmp_path):
    parts = ("tokenizer", "vlm_data", *(f"{f}_model" for f in NEW_FAMILIES), *(f"{f}_stage1" for f in NEW_FAMILIES))
    for name in ("a", "b"):
        build(tmp_path / name, *parts, steps=3)
    for family in NEW_FAMILIES:
        stage1 = family_dir(family, stage1=True).name
        assert digests(tmp_path / "a" / "vlm" / stage1) == digests(tmp_path / "b" / "vlm" / stage1)
