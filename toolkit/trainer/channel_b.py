"""Channel-B sample preparation: rollout → strict parse → Hungarian match → FN-append → Segment.

Owns the per-sample bookkeeping of one Channel-B step (what was decoded, parsed, matched, dropped)
and nothing about gradients: the loop packs the segments and the engine runs the backwards. In vLLM
server mode the same recipe runs one server round at a time (`stream_channel_b`).
A sample that cannot be trained becomes a counted drop; it never fails the step.
"""
from __future__ import annotations

import time
from typing import Iterator

from toolkit.rollout.match import match_boxes
from toolkit.rollout.parse import parse_rollout
from toolkit.rollout.targets import Drop, build_channel_b_segment
from toolkit.trainer.dumps import write_dump
from toolkit.trainer.metrics import StepMetrics
from toolkit.trainer.samples import SampleInput, image_kwargs


def prepare_channel_b(backend, samples: list[SampleInput], step: int, codec, m: StepMetrics, *, rm: dict,
                      sab: dict, max_len: int, ordering: str, dump_to=None) -> list:
    """Decode this rank's step budget and turn each rollout into a training segment; counts go to `m`.

    `dump_to`: a directory to write this step's monitor dump to (rank 0 on dump steps), else None.
    """
    t0 = time.perf_counter()
    rollouts = backend.generate([s.prompt_ids for s in samples], step=step, **image_kwargs(samples))
    t1 = time.perf_counter()
    items: list = []
    segments = rollouts_to_segments(samples, rollouts, codec, m, items, rm=rm, sab=sab, max_len=max_len, ordering=ordering)
    _finish(m, step, codec, items, rm, dump_to, gen_s=t1 - t0, wait_s=t1 - t0, parse_s=time.perf_counter() - t1)
    return segments


def stream_channel_b(backend, samples: list[SampleInput], step: int, codec, m: StepMetrics, *, rm: dict, sab: dict,
                     max_len: int, ordering: str, background: bool, dump_to=None) -> Iterator[list]:
    """`prepare_channel_b` one server round at a time: yields each round's segments (in sample order)
    as soon as the round is decoded, while the next round decodes (`background`; see
    VLLMServerBackend.generate_chunks). The metrics and the dump are complete once it is exhausted."""
    t0 = time.perf_counter()
    chunks = backend.generate_chunks([s.prompt_ids for s in samples], step=step, background=background,
                                     **image_kwargs(samples))
    items: list = []
    gen_s = parse_s = 0.0
    try:
        for idx, rollouts in chunks:
            gen_s = time.perf_counter() - t0  # when the last round arrived: the decode wall time
            t1 = time.perf_counter()
            segments = rollouts_to_segments([samples[i] for i in idx], rollouts, codec, m, items, rm=rm, sab=sab,
                                            max_len=max_len, ordering=ordering)
            parse_s += time.perf_counter() - t1
            yield segments
    finally:
        chunks.close()
    _finish(m, step, codec, items, rm, dump_to, gen_s=gen_s, wait_s=chunks.wait_s, parse_s=parse_s)


def rollouts_to_segments(samples: list[SampleInput], rollouts: list, codec, m: StepMetrics, items: list, *, rm: dict,
                         sab: dict, max_len: int, ordering: str) -> list:
    """Segments of the samples that train; drops and rollout counters go to `m`, (sample, rollout, segment) to `items`."""
    segments = []
    for sample, ro in zip(samples, rollouts):
        seg = rollout_to_segment(sample, ro, codec, rm=rm, sab=sab, max_len=max_len, ordering=ordering)
        items.append((sample, ro, seg))
        for key, value in seg.meta.items():
            m.add_sum(key, value)
        m.add_sum("rollout/finish_length", ro.finish_reason == "length")
        m.add_sum("rollout/repeat_terminated", ro.finish_reason == "repeat")
        m.add_sum("rollout/gen_new_tokens", len(ro.completion_ids))
        if isinstance(seg, Drop):
            m.count(f"stage2/drop/{seg.reason}")
        else:
            segments.append(seg)
    return segments


def _finish(m: StepMetrics, step: int, codec, items: list, rm: dict, dump_to, *, gen_s: float, wait_s: float,
            parse_s: float) -> None:
    """Step-level rollout rates, the monitor dump and the timings (wait = the learner blocked on rollouts)."""
    _rollout_rates(m)
    if dump_to is not None:
        write_dump(dump_to, step, rm["monitor_dump"], codec, items)
    m.time("time/rollout_generate_s", gen_s)
    m.time("time/rollout_wait_s", wait_s)
    m.time("time/rollout_parse_match_s", parse_s)
    m.add_ratio("rollout/gen_tokens_per_s", m.finalize().get("rollout/gen_new_tokens", 0.0), gen_s)


def rollout_to_segment(sample: SampleInput, ro, codec, *, rm: dict, sab: dict, max_len: int, ordering: str):
    """One rollout → Segment (or Drop): the whole Channel-B target recipe for a single sample."""
    if list(ro.prompt_ids) != list(sample.prompt_ids):
        # The engine decoded from another prompt than the one we would train on (e.g. an image expanded
        # twice): learning that completion under our prompt would be silently off-policy. Drop and count.
        return Drop("prompt_mismatch", sample.sample_id, f"engine prompt {len(ro.prompt_ids)} ids, learner "
                    f"{len(sample.prompt_ids)}", meta={"rollout/samples": 1.0, "rollout/prompt_mismatch": 1.0})
    parse = parse_rollout(ro.completion_ids, codec)
    match = match_boxes(
        [o.bbox for o in parse.objects],
        [o["bbox_2d"] for o in sample.gt_objects],
        candidate_top_k=rm["candidate_top_k"],
        gate=rm["maskiou_gate"],
        resolution=rm["maskiou_resolution"],
        fp_cost=rm["fp_cost"],
        fn_cost=rm["fn_cost"],
    )
    seg = build_channel_b_segment(
        sample.prompt_ids,
        parse,
        sample.gt_objects,
        match,
        codec,
        field_order=rm["object_field_order"],
        ordering=ordering,
        desc_ce_weight=sab["desc_ce_weight"],
        drop_invalid_struct_ce_multiplier=sab["channel_b"]["drop_invalid_struct_ce_multiplier"],
        sample_id=sample.sample_id,
        max_len=max_len,
    )
    return with_images(seg, sample, ro.pixels)


def with_images(seg, sample: SampleInput, pixels: dict | None = None):
    """The segment carries its sample's images (packing turns them into pixel inputs) and, when the rollout
    engine already patched them (HF backend), those pixel inputs, so the learner does not patch them again;
    drops pass through."""
    if not isinstance(seg, Drop):
        seg.images, seg.image_grids, seg.pixels = sample.images, sample.image_grids, pixels
    return seg


def _rollout_rates(m: StepMetrics) -> None:
    """Rates recomputed from the summed counters after the cross-rank reduction (Σnum / Σden)."""
    s = m.finalize()
    samples = s.get("rollout/samples", 0.0)
    matched, pred, gt = (s.get(f"rollout/{k}", 0.0) for k in ("matched", "valid_pred_objects", "gt_objects"))
    m.add_ratio("rollout/precision", matched, pred)
    m.add_ratio("rollout/recall", matched, gt)
    m.add_ratio("rollout/f1", 2 * matched, pred + gt)
    m.add_ratio("rollout/parse_truncated_rate", s.get("rollout/parse_truncated", 0.0), samples)
    m.add_ratio("rollout/prompt_mismatch_rate", s.get("rollout/prompt_mismatch", 0.0), samples)
    m.add_ratio("rollout/matched_maskiou_mean", s.get("rollout/matched_maskiou_sum", 0.0), s.get("rollout/matched", 0.0))
    m.add_ratio("rollout/rollout_len_mean", s.get("rollout/rollout_len", 0.0), samples)
