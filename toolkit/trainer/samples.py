"""Records → the trainer's raw samples: prompt ids rendered and tokenized once, images resolved.

A text record's prompt holds its scene; an image record's prompt holds one `<|vision_start|><|image_pad|>
<|vision_end|>` per image, expanded here to one pad per merged patch (toolkit/vlm/inputs.py). The
expanded ids are what Channel-A trains on and what every rollout backend must report back as the
prompt it decoded from (the prompt-parity check in channel_b.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.data.records import RecordError, RecordIssue, load_records
from toolkit.data.render import SYSTEM_PROMPT, USER_INSTRUCTION, render_messages
from toolkit.data.tokenizer import encode_prompt
from toolkit.vlm.images import IMAGE_PLACEHOLDER


@dataclass
class SampleInput:
    """What the trainer knows about one raw sample before decoding."""

    sample_id: str
    prompt_ids: list[int]
    gt_objects: list[dict]
    images: tuple[str, ...] = ()  # absolute paths, in prompt order
    image_grids: tuple[tuple[int, int, int], ...] = ()
    dropped_poly: int = 0  # poly objects data.poly_policy "drop" removed from this record


def image_messages(n_images: int, system: str = SYSTEM_PROMPT) -> list[dict]:
    """Chat messages for an image record: the images first, then the instruction."""
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": IMAGE_PLACEHOLDER * n_images + USER_INSTRUCTION},
    ]


def load_samples(
    path: str,
    tok,
    *,
    limit: int | None = None,
    system: str | None = None,
    vision=None,
    image_root: str | None = None,
    bbox_format: str = "norm1000",
    poly_policy: str = "error",
) -> list[SampleInput]:
    """Validated records of `path` as samples. Image records need `vision` (a VisionProcessor)."""
    system = SYSTEM_PROMPT if system is None else system
    records = load_records(path, limit=limit, image_root=image_root, bbox_format=bbox_format, poly_policy=poly_policy)
    if vision is None and any(rec.images for rec in records):
        raise RecordError(
            [
                RecordIssue(
                    rec.file,
                    rec.line,
                    f"record {rec.id!r} has images but the model has no vision tower",
                    "point model.model at a Qwen-VL folder, or use text records",
                )
                for rec in records
                if rec.images
            ]
        )
    out = []
    for rec in records:
        objects = [dict(o) for o in rec.objects]
        if not rec.images:
            ids = encode_prompt(tok, render_messages(rec.scene, system))
            out.append(SampleInput(rec.id, ids, objects, dropped_poly=rec.dropped_poly))
            continue
        grids = (vision.grid_for_size(rec.width, rec.height),)  # one image per record (docs/DATA.md)
        ids = vision.expand(encode_prompt(tok, image_messages(len(rec.images), system)), grids)
        out.append(SampleInput(rec.id, ids, objects, tuple(rec.images), grids, rec.dropped_poly))
    return out


def image_kwargs(samples) -> dict:
    """`images=` for a backend call when any sample has images; nothing for text (text backends unchanged)."""
    return {"images": [s.images for s in samples]} if any(s.images for s in samples) else {}
