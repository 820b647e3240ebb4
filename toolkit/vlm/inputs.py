"""The learner's image side: which models see images, patch grids, expanded prompts, pixel tensors.

One `VisionProcessor` per process, built from the model folder's own processor (the image-only
Qwen2-VL processor where torchvision is absent), so the learner, the HF backend and vLLM resize and
patch images the same way. Prompts are rendered with one `<|image_pad|>` per image (collapsed) and
expanded here to one pad per merged patch: the ids the learner trains on. The HF backend patches a
step's images once and hands each rollout its own pixel inputs (`split_pixels`), which the learner's
packs join again (`join_pixels`) instead of patching the images a second time. Heavy imports inside.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from toolkit.vlm.images import IMAGE_PAD, open_image
from toolkit.vlm.mrope import Grid


def model_config(model: str) -> dict:
    """`model`'s config.json as a dict; {} when `model` is not a local directory (nothing is downloaded)."""
    path = Path(model) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def image_pad_id(model: str) -> int | None:
    """The `<|image_pad|>` id of a vision-language model (its config has a `vision_config`), else None."""
    cfg = model_config(model)
    if "vision_config" not in cfg:
        return None
    pad = cfg.get("image_token_id", cfg.get("text_config", {}).get("image_token_id"))
    if pad is None:
        raise ValueError(
            f"{model}/config.json has a vision_config but no image_token_id (not a Qwen2-VL-family model?)"
        )
    return int(pad)


class VisionProcessor:
    """Image → (pixel patches, grid) with the model's processor; prompt expansion by grid."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(str(model_dir), trust_remote_code=True)
        self.image_processor = proc.image_processor
        self.pad_id = int(proc.tokenizer.convert_tokens_to_ids(IMAGE_PAD))
        self.merge = int(self.image_processor.merge_size)

    def pixels(self, paths: Sequence[str]):
        """(pixel_values [patches, dim], image_grid_thw [images, 3]) for the images in order."""
        out = self.image_processor(images=[open_image(p) for p in paths], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def grids(self, paths: Sequence[str]) -> tuple[Grid, ...]:
        return tuple(tuple(int(v) for v in g) for g in self.pixels(paths)[1].tolist()) if paths else ()

    def grid_for_size(self, width: int, height: int) -> Grid:
        """The grid `grids()` gives a width×height image, computed from the size alone (records carry it, and
        the loader checks it against the file), so start-up never decodes the dataset's images."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = self.image_processor
        h, w = smart_resize(
            height,
            width,
            factor=ip.patch_size * ip.merge_size,
            min_pixels=ip.size["shortest_edge"],
            max_pixels=ip.size["longest_edge"],
        )
        return (1, h // ip.patch_size, w // ip.patch_size)

    def tokens_per_image(self, grid: Grid) -> int:
        t, h, w = grid
        return t * h * w // (self.merge * self.merge)

    def expand(self, ids: Sequence[int], grids: Sequence[Grid]) -> list[int]:
        """Each single `<|image_pad|>` becomes one pad per merged patch of its image."""
        out: list[int] = []
        images = iter(grids)
        for t in ids:
            if t == self.pad_id:
                grid = next(images, None)
                if grid is None:
                    raise ValueError(f"prompt has more <|image_pad|> tokens than images ({len(grids)})")
                out.extend([t] * self.tokens_per_image(grid))
            else:
                out.append(int(t))
        if next(images, None) is not None:
            raise ValueError(f"prompt has fewer <|image_pad|> tokens than images ({len(grids)})")
        return out

    def model_inputs(self, paths: Sequence[str], device=None) -> dict:
        """Forward kwargs for the images of one row, in order (empty for a text row)."""
        if not paths:
            return {}
        pixel_values, grid = self.pixels(paths)
        if device is not None:
            pixel_values, grid = pixel_values.to(device), grid.to(device)
        return {"pixel_values": pixel_values, "image_grid_thw": grid}


def split_pixels(inputs: dict, images_per_row: Sequence[int]) -> list[dict | None]:
    """`model_inputs` of a batch's images cut into each row's own, in order (None for a row without images).

    Views, no copy: Qwen-VL processors patch every image on its own and concatenate, so a row's slice is
    exactly what `model_inputs` of the row's paths alone gives.
    """
    patches = inputs["image_grid_thw"].prod(-1).tolist() if inputs else []
    out: list[dict | None] = []
    image = patch = 0
    for n in images_per_row:
        if not n:
            out.append(None)
            continue
        k = sum(patches[image : image + n])
        out.append(
            {
                "pixel_values": inputs["pixel_values"][patch : patch + k],
                "image_grid_thw": inputs["image_grid_thw"][image : image + n],
            }
        )
        image, patch = image + n, patch + k
    if image != len(patches):
        raise ValueError(f"{len(patches)} images patched but the rows hold {image}")
    return out


def join_pixels(parts: Sequence[dict]) -> dict:
    """Rows' pixel inputs as one forward's kwargs: patches and grids concatenated in row order."""
    import torch

    return {key: torch.cat([p[key] for p in parts]) for key in ("pixel_values", "image_grid_thw")}
