"""Channel-B sample preparation: rollout → strict parse → Hungarian match → FN-append → Segment.

Owns the per-sample bookkeeping of one Channel-B step (what was decoded, parsed, matched, dropped)
and nothing about gradients: the loop packs the segments and the engine runs the backwards.
A sample that cannot be trained becomes a counted drop; it never fails the step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from toolkit.rollout.match import match_boxes
from toolkit.rollout.parse import parse_rollout
from toolkit.rollout.targets import Drop, build_channel_b_segment


@dataclass
class SampleInput:
    """What the trainer knows about one raw sample before decoding."""

    sample_id: str
    prompt_ids: list[int]
    gt_objects: list[dict]


@dataclass
class ChannelBResult:
    segments: list = field(default_factory=list)
    drops: list = field(default_factory=list)
    counters: dict = field(default_factory=dict)  # summed over samples
    rollout_lens: list = field(default_factory=list)
    times: dict = field(default_factory=dict)


def prepare_channel_b(backend, samples: list[SampleInput], step: int, codec, rm: dict, sab: dict, max_len: int) -> ChannelBResult:
    """Decode every sample of this rank's step budget and turn each rollout into a training segment."""
    res = ChannelBResult()
    t0 = time.perf_counter()
    rollouts = backend.generate([s.prompt_ids for s in samples], step=step)
    t1 = time.perf_counter()
    for sample, ro in zip(samples, rollouts):
        seg = rollout_to_segment(sample, ro, codec, rm, sab, max_len)
        _add_counters(res.counters, seg.meta if not isinstance(seg, Drop) else getattr(seg, "meta", {}) or {})
        res.rollout_lens.append(len(ro.completion_ids))
        res.counters["rollout/finish_length"] = res.counters.get("rollout/finish_length", 0) + (ro.finish_reason == "length")
        (res.drops if isinstance(seg, Drop) else res.segments).append(seg)
    res.times = {"time/rollout_generate_s": t1 - t0, "time/rollout_parse_match_s": time.perf_counter() - t1}
    return res


def rollout_to_segment(sample: SampleInput, ro, codec, rm: dict, sab: dict, max_len: int):
    """One rollout → Segment (or Drop): the whole Channel-B target recipe for a single sample."""
    parse = parse_rollout(ro.completion_ids, codec)
    preds = [o.bbox for o in parse.objects]
    gts = [o["bbox_2d"] for o in sample.gt_objects]
    match = match_boxes(
        preds,
        gts,
        candidate_top_k=rm["candidate_top_k"],
        gate=rm["maskiou_gate"],
        resolution=rm["maskiou_resolution"],
        fp_cost=rm["fp_cost"],
        fn_cost=rm["fn_cost"],
    )
    return build_channel_b_segment(
        sample.prompt_ids,
        parse,
        sample.gt_objects,
        match,
        codec,
        field_order=rm["object_field_order"],
        desc_ce_weight=sab["desc_ce_weight"],
        drop_invalid_struct_ce_multiplier=sab["channel_b"]["drop_invalid_struct_ce_multiplier"],
        sample_id=sample.sample_id,
        max_len=max_len,
    )


def _add_counters(into: dict, meta: dict) -> None:
    for k, v in meta.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            into[k] = into.get(k, 0) + v
