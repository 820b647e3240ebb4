"""Helpers shared by several test folders (importable because tests/conftest.py puts tests/ on sys.path)."""
from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_model_dir(tmp: Path) -> Path:
    """The committed random-init tiny Qwen2 + tokenizer as one from_pretrained / vLLM directory
    (untied, head_dim 32) — tests that must not depend on the Stage-1 checkpoint use it."""
    out = Path(tmp) / "tiny_model"
    if not out.exists():
        out.mkdir(parents=True)
        for part in ("tiny_qwen2", "tokenizer"):
            for f in (ROOT / "assets" / part).iterdir():
                shutil.copy(f, out / f.name)
    return out


def tiny_vlm_dir() -> Path:
    """The committed random-init tiny Qwen2-VL folder (model + literal tokenizer + image-only processor),
    made by `assets/build_assets.py`; tests load it read-only."""
    out = ROOT / "assets" / "vlm" / "tiny_qwen2_vl"
    if not (out / "config.json").is_file():
        raise FileNotFoundError(f"{out} is missing: rebuild it with `python assets/build_assets.py --only vlm_model`")
    return out


def shape_images(tmp: Path, sizes=((112, 112), (84, 112), (112, 56))) -> list[str]:
    """Deterministic noise PNGs of the given (width, height) sizes; their paths."""
    import numpy as np
    from PIL import Image

    paths = []
    for i, (w, h) in enumerate(sizes):
        path = Path(tmp) / f"img{i}.png"
        Image.fromarray((np.random.RandomState(i).rand(h, w, 3) * 255).astype("uint8")).save(path)
        paths.append(str(path))
    return paths


VLM_ASSET = ROOT / "assets" / "vlm" / "tiny_qwen2_vl"
VLM_SPECIAL = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")  # ids 1319..1322


def tiny_vlm_dir(tmp: Path) -> Path:
    """A tiny random-init Qwen2-VL (text hidden 64, 2 heads of 32, vision depth 2; 112×112 → 16 image pads)
    with our literal tokenizer + vision tokens and the image-only processor, as one HF / vLLM directory.

    The committed `assets/vlm/tiny_qwen2_vl/` when it exists; otherwise built here (deterministic, ~5 s)."""
    if (VLM_ASSET / "config.json").exists():
        return VLM_ASSET
    out = Path(tmp) / "tiny_qwen2_vl"
    if not (out / "config.json").exists():
        build_tiny_vlm(out)
    return out


def build_tiny_vlm(out: Path) -> None:
    """Same recipe as the assets part: text config of the tiny Qwen2 scaled down, mRoPE, untied head."""
    import json

    import torch
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from toolkit.vlm import processing_image_only
    from toolkit.vlm.processing_image_only import ImageOnlyQwen2VLProcessor

    tok = AutoTokenizer.from_pretrained(str(ROOT / "assets" / "tokenizer"), trust_remote_code=True)
    tok.add_special_tokens({"additional_special_tokens": list(VLM_SPECIAL)})
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False,
                rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6], "rope_type": "default"},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                        vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(cfg).float()
    model.save_pretrained(str(out))
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    ImageOnlyQwen2VLProcessor(image_processor=images, tokenizer=tok, chat_template=tok.chat_template).save_pretrained(str(out))
    shutil.copy(processing_image_only.__file__, out / "processing_image_only.py")
    conf = out / "processor_config.json"  # remote code: AutoProcessor builds the image-only processor
    data = json.loads(conf.read_text())
    data["auto_map"] = {"AutoProcessor": "processing_image_only.ImageOnlyQwen2VLProcessor"}
    conf.write_text(json.dumps(data, indent=2))
