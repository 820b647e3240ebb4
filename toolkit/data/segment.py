"""The teacher-forced training segment: the one data type shared by Channel-A, Channel-B and packing.

A segment is one raw sample turned into a full token sequence (prompt + assistant answer + end-of-turn)
with per-token supervision. Positions index `input_ids`; a "label position" t means the token at t is
the target, predicted from the logits at t-1 (causal shift). Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Segment:
    """One trainable sample.

    input_ids:   prompt ids followed by the assistant ids (ending with <|im_end|>).
    prompt_len:  number of prompt tokens; labels before it are never supervised.
    ce_weights:  len(input_ids) floats; weight of the CE term for predicting token t (0 = not supervised).
                 Coordinate tokens always have weight 0 (they get geometry/coord losses instead).
    coord_pos:   label positions of supervised coordinate slots, 4 per box, in box order x1, y1, x2, y2.
    coord_bins:  ground-truth bin (0..999) for each entry of coord_pos.
    box_groups:  "prefix" (matched rollout object) or "fn" (appended / Channel-A object), one per box.
    channel:     "A" or "B".
    sample_id:   the record id, for dumps and debugging.
    meta:        per-sample metrics (parse/match counters, lengths) summed into the step's metrics.
    images:      absolute image paths the prompt's `<|image_pad|>` runs stand for, in order (VLM only).
    image_grids: each image's (t, h, w) patch grid; the prompt holds t·h·w/merge² pads per image.
    pixels:      the images' pixel inputs as the rollout engine patched them (HF backend), else None
                 (the learner patches `images` itself).
    """

    input_ids: list[int]
    prompt_len: int
    ce_weights: list[float]
    coord_pos: list[int] = field(default_factory=list)
    coord_bins: list[int] = field(default_factory=list)
    box_groups: list[str] = field(default_factory=list)
    channel: str = "A"
    sample_id: str = ""
    meta: dict = field(default_factory=dict)
    images: tuple[str, ...] = ()
    image_grids: tuple[tuple[int, int, int], ...] = ()
    pixels: dict | None = field(default=None, compare=False, repr=False)  # tensors: kept out of == and repr

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if len(self.ce_weights) != n:
            raise ValueError(f"segment {self.sample_id}: ce_weights has {len(self.ce_weights)} entries for {n} tokens")
        if len(self.coord_pos) != len(self.coord_bins) or len(self.coord_pos) != 4 * len(self.box_groups):
            raise ValueError(
                f"segment {self.sample_id}: {len(self.coord_pos)} coord slots, {len(self.coord_bins)} bins, "
                f"{len(self.box_groups)} boxes (need 4 slots and 4 bins per box)"
            )
        if self.coord_pos and not (self.prompt_len <= min(self.coord_pos) and max(self.coord_pos) < n):
            raise ValueError(f"segment {self.sample_id}: coord position outside the assistant span")

    def __len__(self) -> int:
        return len(self.input_ids)
