"""Rollout eval: decode the val set in decode_batch_size chunks → strict parse → match → detection metrics.

No teacher-forced pass and no eval loss. Each rank decodes an equal-sized shard
(padded by repeating its last prompt, whose results are discarded) so ZeRO-3's synchronized forwards
line up; the counters are merged with the same one-collective reduction as training metrics.
"""
from __future__ import annotations

import time

from toolkit.rollout.match import detection_counts
from toolkit.rollout.parse import parse_rollout
from toolkit.trainer.metrics import StepMetrics, reduce_metrics
from toolkit.trainer.samples import image_kwargs

PREFIX = "eval_rollout"


def shard(items: list, rank: int, world_size: int) -> tuple[list, int]:
    """Rank's interleaved share, padded to ceil(n / W) with its last item; returns (shard, n_real)."""
    mine = items[rank::world_size]
    size = -(-len(items) // world_size)
    n_real = len(mine)
    if mine and n_real < size:
        mine = mine + [mine[-1]] * (size - n_real)
    return mine, n_real


def evaluate_rollouts(backend, val_set: list, codec, rm: dict, *, rank: int, world_size: int, step: int) -> dict:
    t0 = time.perf_counter()
    samples, n_real = shard(val_set, rank, world_size)
    rollouts = backend.generate([s.prompt_ids for s in samples], step=step, **image_kwargs(samples)) if samples else []
    m = StepMetrics()
    for sample, ro in list(zip(samples, rollouts))[:n_real]:
        score_rollout(m, sample, ro, codec, rm)
    m.time(f"{PREFIX}/runtime_s", time.perf_counter() - t0)
    return reduce_metrics(m)


def score_rollout(m: StepMetrics, sample, ro, codec, rm: dict) -> None:
    """Add one rollout's parse and match counts to `m` (training-gate matching and the class-aware F1@0.5)."""
    parse = parse_rollout(ro.completion_ids, codec)
    preds = [o.bbox for o in parse.objects]
    gts = [o["bbox_2d"] for o in sample.gt_objects]
    knobs = dict(candidate_top_k=rm["candidate_top_k"], resolution=rm["maskiou_resolution"],
                 fp_cost=rm["fp_cost"], fn_cost=rm["fn_cost"])
    gate = detection_counts(preds, gts, gate=rm["maskiou_gate"], **knobs)
    strict = detection_counts(preds, gts, gate=0.5, pred_descs=[o.desc for o in parse.objects],
                              gt_descs=[o["desc"] for o in sample.gt_objects], require_desc_match=True, **knobs)
    m.add_detection_counts(PREFIX, gate.matched, gate.pred, gate.gt)
    m.add_detection_counts(f"{PREFIX}/class50", strict.matched, strict.pred, strict.gt)
    m.add_ratio(f"{PREFIX}/matched_iou_mean", gate.iou_sum, gate.matched)
    m.add_sum(f"{PREFIX}/gating_rejections", gate.gating_rejections)
    m.add_ratio(f"{PREFIX}/valid_json_rate", float(_valid_json(parse)), 1.0)
    m.add_ratio(f"{PREFIX}/parse_truncated_rate", float(parse.truncated), 1.0)
    m.add_sum(f"{PREFIX}/parse_dropped_invalid", parse.n_dropped)
    m.add_ratio(f"{PREFIX}/sample_any_match_rate", float(gate.matched > 0), 1.0)
    m.add_mean(f"{PREFIX}/rollout_len_mean", len(ro.completion_ids))
    m.add_sum(f"{PREFIX}/samples", 1)


def _valid_json(parse) -> bool:
    """The rollout closed one well-formed JSON object, stopped at <|im_end|>, and lost no object to validation."""
    return parse.stopped_at_im_end and not (parse.truncated or parse.malformed or parse.n_dropped)
