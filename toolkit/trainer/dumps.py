"""Qualitative rollout dumps (`rollout_matching.monitor_dump`): what the model wrote and what it was taught.

Every `every_steps` Channel-B steps, rank 0 writes `<output_dir>/monitor_dumps/step_000040.jsonl` with up
to `max_samples` samples: the rollout text, how it parsed and matched, and the teacher-forced target
with its supervised tokens marked. Reading these is the fastest way to see format drift or object spam.
"""

from __future__ import annotations

import json
from pathlib import Path

from toolkit.config.settings import MonitorSettings
from toolkit.rollout.targets import Drop


def due(md: MonitorSettings, step: int, rank: int) -> bool:
    """`step`: the 0-based index of the step being run (step `step + 1` in every output)."""
    return bool(md.enabled) and rank == 0 and (step + 1) % md.every_steps == 0


def write_dump(out_dir: Path, step: int, md: MonitorSettings, codec, items: list[tuple]) -> Path:
    """`items` are (sample, rollout, segment-or-drop) triples; writes at most md.max_samples of them.
    The file is named like the step's metrics line and checkpoint: optimizer steps completed (index + 1)."""
    from toolkit.runlayout import monitor_dump_path

    path = monitor_dump_path(out_dir, step + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cap = md.max_text_chars
    with path.open("w", encoding="utf-8") as f:
        for sample, ro, seg in items[: md.max_samples]:
            f.write(json.dumps(_record(sample, ro, seg, codec, cap), ensure_ascii=False) + "\n")
    return path


def _record(sample, ro, seg, codec, cap: int) -> dict:
    text = lambda ids: "".join(codec.pieces(list(ids)))[:cap]  # noqa: E731
    rec = {
        "sample_id": sample.sample_id,
        "finish_reason": ro.finish_reason,
        "rollout": text(ro.completion_ids),
        "gt": sample.gt_objects,
    }
    if isinstance(seg, Drop):
        rec.update(dropped=seg.reason, detail=seg.detail)
    else:
        answer = seg.input_ids[seg.prompt_len :]
        weights = seg.ce_weights[seg.prompt_len :]
        rec["target"] = text(answer)
        # The target with every CE-supervised token wrapped in ⟦ ⟧ (coordinate slots get geometry instead).
        rec["target_supervised"] = "".join(
            f"⟦{p}⟧" if w > 0 else p for p, w in zip(codec.pieces(list(answer)), weights)
        )[:cap]
    rec["counters"] = {k: v for k, v in seg.meta.items() if isinstance(v, (int, float))}
    return rec
