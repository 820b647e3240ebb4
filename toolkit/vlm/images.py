"""Image helpers every VLM path shares (learner, HF rollouts, vLLM colocate, rollout server).

The learner trains on the *expanded* prompt: one `<|image_pad|>` per merged vision patch. vLLM wants the
*collapsed* prompt (one pad per image) and expands it itself; the ids it reports back must equal the
learner's expanded ids, which is the per-sample prompt-parity check (docs/VLM.md). Imports only PIL.
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PLACEHOLDER = f"{VISION_START}{IMAGE_PAD}{VISION_END}"


def collapse_image_pads(ids: Sequence[int], pad_id: int) -> list[int]:
    """Each run of `pad_id` becomes a single `pad_id` (what vLLM expects per image).

    >>> collapse_image_pads([5, 9, 9, 9, 6, 9, 9, 7], 9)
    [5, 9, 6, 9, 7]
    """
    out: list[int] = []
    for t in ids:
        if t == pad_id and out and out[-1] == pad_id:
            continue
        out.append(int(t))
    return out


def open_image(path: str):
    """An RGB PIL image, fully loaded (so the file handle is closed)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")
