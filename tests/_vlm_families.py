"""The tiny vision-language families of assets/vlm/ (made by assets/build_assets.py), for tests.

Qwen2-VL is the shipped default; Qwen2.5-VL and Qwen3-VL come from assets/vlm_families.py. Each has a
random-init folder and a Stage-1 folder; tests load them read-only.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {
    # family: (init folder, Stage-1 folder, architecture)
    "qwen2_vl": ("tiny_qwen2_vl", "stage1", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("tiny_qwen2_5_vl", "stage1_qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("tiny_qwen3_vl", "stage1_qwen3_vl", "Qwen3VLForConditionalGeneration"),
}
NEW_FAMILIES = ("qwen2_5_vl", "qwen3_vl")


def family_dir(family: str, stage1: bool = False) -> Path:
    init, trained, _ = FAMILIES[family]
    out = ROOT / "assets" / "vlm" / (trained if stage1 else init)
    if not (out / "config.json").is_file():
        part = f"{family}_{'stage1' if stage1 else 'model'}" if family != "qwen2_vl" else "vlm_model,vlm_stage1"
        raise FileNotFoundError(f"{out} is missing: rebuild it with `python assets/build_assets.py --only {part}`")
    return out


def load_hf(model_dir: Path):
    """The fp32 HF model of a family folder, in eval mode."""
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
