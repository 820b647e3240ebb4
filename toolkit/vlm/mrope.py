"""Multimodal rotary position ids (Qwen2-VL M-RoPE) for one segment and for a packed row.

Qwen2-VL rotates every token by three positions (temporal, height, width). Text tokens use the same
running index on all three rows; an image's merged patches use (start + t, start + h, start + w) over
its grid, and the text after it resumes at start + max(t, h, w). Packing puts several segments in one
row, so each segment restarts at 0, and a fourth row (plain 0..len-1 per segment) goes on top: it is
what transformers reads to build the block-causal mask of a packed row (`position_ids` [4, 1, L]).
Pure Python; the caller makes tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

Grid = tuple[int, int, int]


def segment_mrope(ids: Sequence[int], grids: Sequence[Grid], pad_id: int, merge: int) -> list[list[int]]:
    """Three rows (t, h, w) of M-RoPE positions for one unpadded sequence.

    `grids` are the images' (t, h, w) patch grids in order; each image occupies t·h·w/merge² consecutive
    `pad_id` tokens.

    >>> segment_mrope([7, 9, 9, 9, 9, 8], [(1, 4, 4)], pad_id=9, merge=2)
    [[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]]
    """
    rows: list[list[int]] = [[], [], []]
    pos, i, images = 0, 0, iter(grids)
    while i < len(ids):
        if ids[i] != pad_id:
            for r in rows:
                r.append(pos)
            pos, i = pos + 1, i + 1
            continue
        t, h, w = next(images)
        h, w = h // merge, w // merge
        for ti in range(t):
            for hi in range(h):
                for wi in range(w):
                    rows[0].append(pos + ti)
                    rows[1].append(pos + hi)
                    rows[2].append(pos + wi)
        i += t * h * w
        pos += max(t, h, w)
    if len(rows[0]) != len(ids):
        raise ValueError(f"image grids {list(grids)} do not cover the {sum(1 for t in ids if t == pad_id)} image pads")
    return rows


def packed_mrope(segments: Sequence[tuple[Sequence[int], Sequence[Grid]]], pad_id: int, merge: int) -> list[list[int]]:
    """Four rows for a packed row: per-segment text positions, then the three M-RoPE rows, each restarting at 0.

    >>> packed_mrope([([5, 6], []), ([7, 9, 8], [(1, 2, 2)])], pad_id=9, merge=2)
    [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2], [0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]
    """
    rows: list[list[int]] = [[], [], [], []]
    for ids, grids in segments:
        rows[0].extend(range(len(ids)))
        for r, seg_row in zip(rows[1:], segment_mrope(ids, grids, pad_id, merge)):
            r.extend(seg_row)
    return rows
