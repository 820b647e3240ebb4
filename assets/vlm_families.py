"""Tiny Qwen2.5-VL and Qwen3-VL folders and their short Stage-1s (parts of assets/build_assets.py).

Same recipe as the tiny Qwen2-VL (build_assets.py, "VLM"): transformers' own config classes, random
init with a fixed seed, the literal tokenizer plus the four vision tokens, an image-only processor
shipped as remote code (toolkit/vlm/processing_image_only_vl.py), then teacher forcing on the shape
images. What differs per family is in FAMILIES: Qwen2.5-VL has window attention in the vision tower
(`window_size`, `fullatt_block_indexes`); Qwen3-VL has patch 16, learned vision position embeddings,
DeepStack mergers (`deepstack_visual_indexes`) and interleaved M-RoPE. See assets/README.md.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from build_assets import (  # noqa: E402  (assets/ is on sys.path when build_assets runs)
    HERE,
    VISION_TOKENS,
    VLM_DIR,
    VLM_STAGE1,
    encode_vlm_split,
    pin_tokenizer_class,
    save_vlm_stage1,
    train_vlm,
    vlm_tokenizer,
)

from toolkit.data.records import load_records

PROCESSOR_MODULE = "processing_image_only_vl"  # toolkit/vlm/processing_image_only_vl.py, shipped as remote code
# The text model of every tiny family: head_dim 32 (vLLM's CPU attention rejects 16), untied, fp32.
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
}
FAMILIES = {
    "qwen2_5_vl": {
        "config": "Qwen2_5_VLConfig",
        "model": "Qwen2_5_VLForConditionalGeneration",
        "processor": "ImageOnlyQwen2_5_VLProcessor",
        "init_dir": "tiny_qwen2_5_vl",
        "stage1_dir": "stage1_qwen2_5_vl",
        "init_seed": 4322,
        "text": dict(
            TEXT,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "type": "mrope",
                "mrope_section": [4, 6, 6],
            },
        ),
        # window 56 px = 2 x 2 merged units: a 112 px image has 4 windows; block 0 windowed, block 1 full
        "vision": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "in_channels": 3,
        },
        # 112 x 112 stays 112 x 112: 8 x 8 patches of 14 px, 16 image tokens
        "image": {
            "min_pixels": 56 * 56,
            "max_pixels": 112 * 112,
            "patch_size": 14,
            "merge_size": 2,
            "temporal_patch_size": 2,
        },
    },
    "qwen3_vl": {
        "config": "Qwen3VLConfig",
        "model": "Qwen3VLForConditionalGeneration",
        "processor": "ImageOnlyQwen3VLProcessor",
        "init_dir": "tiny_qwen3_vl",
        "stage1_dir": "stage1_qwen3_vl",
        "init_seed": 4323,
        # interleaved M-RoPE over head_dim / 2 = 16 frequencies, sections in the real model's 24:20:20 ratio
        "text": dict(
            TEXT,
            head_dim=32,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
        ),
        # DeepStack: features after vision blocks 0 and 1 go through their own mergers into LM layers 0 and 1
        "vision": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 1],
        },
        # 112 x 112 resizes to 128 x 128 (a multiple of patch 16 x merge 2): 8 x 8 patches, 16 image tokens
        "image": {
            "min_pixels": 64 * 64,
            "max_pixels": 128 * 128,
            "patch_size": 16,
            "merge_size": 2,
            "temporal_patch_size": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    },
}
# Stage-1: the Qwen2-VL recipe, shorter (valid JSON >= 0.9 comes early; assets/README.md has the curves).
STAGE1 = dict(VLM_STAGE1, steps=300, warmup_steps=30, eval_every=50)


def family_config(family: str, tok):
    import transformers

    fam = FAMILIES[family]
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    specials = {
        "bos_token_id": tok.convert_tokens_to_ids("<|im_start|>"),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    text = dict(fam["text"], vocab_size=len(tok), tie_word_embeddings=False, **specials)
    return getattr(transformers, fam["config"])(
        text_config=text,
        vision_config=dict(fam["vision"]),
        tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **specials,
    )


def family_processor(family: str, tok):
    """The image-only processor built in process (PIL image processor, no torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from toolkit.vlm import processing_image_only_vl

    cls = getattr(processing_image_only_vl, FAMILIES[family]["processor"])
    return cls(
        image_processor=Qwen2VLImageProcessorPil(**FAMILIES[family]["image"]),
        tokenizer=tok,
        chat_template=tok.chat_template,
    )


def save_family_processor(family: str, folder: Path, tok) -> None:
    family_processor(family, tok).save_pretrained(str(folder))
    shutil.copyfile(HERE.parent / "toolkit" / "vlm" / f"{PROCESSOR_MODULE}.py", folder / f"{PROCESSOR_MODULE}.py")
    cfg_path = folder / "processor_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["auto_map"] = {"AutoProcessor": f"{PROCESSOR_MODULE}.{FAMILIES[family]['processor']}"}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    pin_tokenizer_class(folder)  # config.json names a qwen model type: keep AutoTokenizer literal


def build_family_model(out: Path, family: str) -> None:
    """Random-init model of `family` (fixed seed, fp32, untied) + processor + tokenizer into vlm/<init_dir>."""
    import torch
    import transformers

    fam = FAMILIES[family]
    tok = vlm_tokenizer(out)
    torch.manual_seed(fam["init_seed"])
    model = getattr(transformers, fam["model"])(family_config(family, tok)).float()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    folder = out / VLM_DIR / fam["init_dir"]
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(str(folder))
    save_family_processor(family, folder, tok)


def build_family_stage1(out: Path, family: str, steps: int | None = None) -> dict:
    """Teacher-force vlm/<init_dir> on vlm/data; model + the init folder's files + curve into vlm/<stage1_dir>."""
    import torch
    import transformers

    from toolkit.data.tokenizer import load_tokenizer

    fam = FAMILIES[family]
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cfg = dict(STAGE1, **({"steps": steps} if steps is not None else {}))
    init = out / VLM_DIR / fam["init_dir"]
    tok = load_tokenizer(init)
    proc = family_processor(family, tok)
    model = getattr(transformers, fam["model"]).from_pretrained(str(init), dtype=torch.float32)
    train_records = load_records(out / VLM_DIR / "data" / "train.jsonl")
    val_records = load_records(out / VLM_DIR / "data" / "val.jsonl")
    train, val = encode_vlm_split(proc, tok, train_records), encode_vlm_split(proc, tok, val_records)
    log = lambda row: print(json.dumps({"family": family, **row}), file=sys.stderr, flush=True)  # noqa: E731
    curve = train_vlm(model, tok, train, val, val_records, cfg, log)
    return save_vlm_stage1(model, init, out / VLM_DIR / fam["stage1_dir"], curve)
