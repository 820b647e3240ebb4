"""Shared by the vLLM image tests: prompts with images as the learner builds them, and the HF reference.

The learner renders one `<|image_pad|>` per image and expands it to one pad per merged vision patch
(toolkit.vlm.inputs.VisionProcessor): those expanded ids are what every backend receives.
"""

from __future__ import annotations

from pathlib import Path

from _shared import greedy_settings

EOS = 2
TEXTS = ("find the cats", "boxes please", "where is the car")
TEXT_ONLY = "no image here"  # one text prompt rides along in every image batch


def settings(dbs: int):
    return greedy_settings(max_new_tokens=24, decode_batch_size=dbs, seed=7)


def chat(text: str, images: int) -> str:
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * images
    return f"<|im_start|>user\n{vision}{text}<|im_end|>\n<|im_start|>assistant\n"


def vlm_batch(model_dir: Path, image_paths: list[str]) -> tuple[list[list[int]], list[tuple[str, ...]]]:
    """(expanded prompt ids, image paths per prompt): one prompt per image, then one text-only prompt."""
    from transformers import AutoTokenizer

    from toolkit.vlm.inputs import VisionProcessor

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    vision = VisionProcessor(model_dir)
    prompts, images = [], []
    for text, path in zip(TEXTS, image_paths):
        ids = tok(chat(text, 1), add_special_tokens=False)["input_ids"]
        prompts.append(vision.expand(ids, vision.grids([path])))
        images.append((path,))
    prompts.append(tok(chat(TEXT_ONLY, 0), add_special_tokens=False)["input_ids"])
    images.append(())
    return prompts, images


def hf_learner(model_dir: Path):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def hf_greedy(learner, model_dir: Path, prompts, images) -> list[list[int]]:
    """HF `generate` greedy ids, one prompt at a time (no padding: the plain reference)."""
    from toolkit.rollout.backends.hf import HFBackend
    from toolkit.vlm.inputs import VisionProcessor

    ref = HFBackend(learner, settings(1), pad_id=0, eos_id=EOS, vision=VisionProcessor(model_dir))
    return [r.completion_ids for r in ref.generate(prompts, step=0, images=images)]


def perturb(model, seed: int, prefix: str = "", scale: float = 0.05) -> None:
    """The 'optimizer step': noise on every parameter whose name starts with `prefix`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefix):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def weights_of(model):
    return lambda device: ((n, p.detach().to(device)) for n, p in model.named_parameters())
