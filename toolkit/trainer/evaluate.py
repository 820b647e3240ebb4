"""Rollout eval: decode the val set in decode_batch_size chunks → strict parse → match → detection metrics.

One function, `run_eval`, serves the training loop's eval and `stage2 eval` (toolkit/eval_cmd.py), so a
checkpoint scored offline gets exactly the `eval_rollout/*` numbers training logged for it.

No teacher-forced pass and no eval loss. Each rank decodes an equal-sized shard
(padded by repeating its last prompt, whose results are discarded) so ZeRO-3's synchronized forwards
line up; the counters are merged with the same one-collective reduction as training metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from toolkit.config.settings import MatchSettings, Settings
from toolkit.rollout.match import match_boxes
from toolkit.rollout.parse import parse_rollout
from toolkit.trainer.channel_b import match_kwargs
from toolkit.trainer.metrics import StepMetrics, reduce_metrics
from toolkit.trainer.samples import image_kwargs

PREFIX = "eval_rollout"


@dataclass
class EvalResult:
    """The reduced metrics (same dict on every rank) and this rank's first `keep` per-sample records."""

    metrics: dict
    records: list[dict] = field(default_factory=list)


def shard(items: list, rank: int, world_size: int) -> tuple[list, int]:
    """Rank's interleaved share, padded to ceil(n / W) with its last item; returns (shard, n_real)."""
    mine = items[rank::world_size]
    size = -(-len(items) // world_size)
    n_real = len(mine)
    if mine and n_real < size:
        mine = mine + [mine[-1]] * (size - n_real)
    return mine, n_real


def run_eval(
    backend,
    val_set: list,
    codec,
    settings: Settings,
    *,
    rank: int,
    world_size: int,
    step: int,
    keep: int = 0,
    progress: bool = False,
) -> EvalResult:
    """Decode this rank's shard in decode_batch_size chunks (every rank makes the same number of calls),
    score each rollout, reduce once. `keep`: how many per-sample records (rollout text, parsed objects,
    matches) to return from this rank; `progress`: show an eval bar (rank 0, a terminal only)."""
    from tqdm import tqdm

    from toolkit.trainer.console import interactive

    t0 = time.perf_counter()
    samples, n_real = shard(val_set, rank, world_size)
    size = settings.decode.decode_batch_size
    m, records = StepMetrics(), []
    bar = tqdm(
        total=n_real,
        desc="eval",
        unit="sample",
        leave=False,
        disable=not (progress and interactive(rank)),
        dynamic_ncols=True,
    )
    for start in range(0, len(samples), size):
        chunk = samples[start : start + size]
        rollouts = backend.generate([s.prompt_ids for s in chunk], step=step, **image_kwargs(chunk))
        for i, (sample, ro) in enumerate(zip(chunk, rollouts)):
            if start + i >= n_real:
                break  # padding: decoded only to keep the ranks' forwards in step
            record = score_rollout(m, sample, ro, codec, settings.match)
            if len(records) < keep:
                records.append(record)
        bar.update(min(len(chunk), max(0, n_real - start)))
    bar.close()
    m.time(f"{PREFIX}/runtime_s", time.perf_counter() - t0)
    return EvalResult(reduce_metrics(m), records)


def score_rollout(m: StepMetrics, sample, ro, codec, match: MatchSettings) -> dict:
    """Add one rollout's parse and match counts to `m` (training-gate matching and the class-aware F1@0.5);
    return the sample's record: rollout text, parsed objects, GT and the gate matching."""
    parse = parse_rollout(ro.completion_ids, codec)
    preds = [o.bbox for o in parse.objects]
    gts = [o["bbox_2d"] for o in sample.gt_objects]
    knobs = match_kwargs(match)
    gate = match_boxes(preds, gts, gate=match.maskiou_gate, **knobs)
    strict = match_boxes(
        preds,
        gts,
        gate=0.5,
        pred_descs=[o.desc for o in parse.objects],
        gt_descs=[o["desc"] for o in sample.gt_objects],
        require_desc_match=True,
        **knobs,
    )
    m.add_detection_counts(PREFIX, len(gate.pairs), len(preds), len(gts))
    m.add_detection_counts(f"{PREFIX}/class50", len(strict.pairs), len(preds), len(gts))
    m.add_ratio(f"{PREFIX}/matched_iou_mean", gate.iou_sum, len(gate.pairs))
    m.add_sum(f"{PREFIX}/gating_rejections", gate.gating_rejections)
    m.add_ratio(f"{PREFIX}/valid_json_rate", float(_valid_json(parse)), 1.0)
    m.add_ratio(f"{PREFIX}/parse_truncated_rate", float(parse.truncated), 1.0)
    m.add_sum(f"{PREFIX}/parse_dropped_invalid", parse.n_dropped)
    m.add_ratio(f"{PREFIX}/sample_any_match_rate", float(len(gate.pairs) > 0), 1.0)
    m.add_mean(f"{PREFIX}/rollout_len_mean", len(ro.completion_ids))
    m.add_sum(f"{PREFIX}/samples", 1)
    return {
        "sample_id": sample.sample_id,
        "images": list(sample.images),
        "rollout": "".join(codec.pieces(list(ro.completion_ids))),
        "finish_reason": ro.finish_reason,
        "valid_json": _valid_json(parse),
        "gt": [{"desc": o["desc"], "bbox_2d": list(o["bbox_2d"])} for o in sample.gt_objects],
        "pred": [{"desc": o.desc, "bbox_2d": list(o.bbox)} for o in parse.objects],
        "match": {
            "pairs": [[p, g, round(iou, 4)] for p, g, iou in gate.pairs],
            "fp": gate.fp_indices,
            "fn": gate.fn_indices,
        },
        "class50_matched": len(strict.pairs),
    }


def _valid_json(parse) -> bool:
    """The rollout closed one well-formed JSON object, stopped at <|im_end|>, and lost no object to validation."""
    return parse.stopped_at_im_end and not (parse.truncated or parse.malformed or parse.n_dropped)
