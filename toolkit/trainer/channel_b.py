"""Channel-B sample preparation: rollout → strict parse → Hungarian match → FN-append → Segment.

Owns the per-sample bookkeeping of one Channel-B step (what was decoded, parsed, matched, dropped)
and nothing about gradients: the learner packs the segments and the engine runs the backwards. The
step's rollouts arrive in rounds (`RolloutBackend.generate_chunks`: one round for hf and vLLM colocate,
one per server round in vLLM server mode); `channel_b_rounds` turns each round into its segments.
A sample that cannot be trained becomes a counted drop; it never fails the step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from toolkit.config.settings import MatchSettings, MonitorSettings
from toolkit.rollout.match import match_boxes
from toolkit.rollout.parse import parse_rollout
from toolkit.rollout.targets import Drop, build_channel_b_segment
from toolkit.trainer.dumps import write_dump
from toolkit.trainer.metrics import StepMetrics
from toolkit.trainer.samples import SampleInput, image_kwargs


@dataclass(frozen=True)
class ChannelBSettings:
    """What Channel-B reads besides the rollouts, built once at setup (`from_config`)."""

    match: MatchSettings
    monitor: MonitorSettings
    field_order: str  # template.object_field_order
    ordering: str  # template.object_ordering
    desc_ce_weight: float
    drop_invalid_struct_ce_multiplier: float
    max_len: int  # global_max_length

    @classmethod
    def from_config(cls, cfg) -> ChannelBSettings:
        sab = cfg.stage2_ab
        return cls(
            match=cfg.settings.match,
            monitor=cfg.settings.monitor,
            field_order=cfg.settings.object_field_order,
            ordering=cfg.template.object_ordering,
            desc_ce_weight=sab.desc_ce_weight,
            drop_invalid_struct_ce_multiplier=sab.channel_b.drop_invalid_struct_ce_multiplier,
            max_len=cfg.global_max_length,
        )


def match_kwargs(ms: MatchSettings) -> dict:
    """`match_boxes` keywords of the configured matching, gate excluded (eval also matches at IoU 0.5)."""
    return dict(
        candidate_top_k=ms.candidate_top_k, resolution=ms.maskiou_resolution, fp_cost=ms.fp_cost, fn_cost=ms.fn_cost
    )


def channel_b_rounds(
    backend,
    samples: list[SampleInput],
    step: int,
    codec,
    m: StepMetrics,
    cb: ChannelBSettings,
    *,
    background: bool,
    dump_to: Path | None = None,
) -> Iterator[tuple[list, bool]]:
    """Decode this rank's step budget and yield, per rollout round, (its segments in sample order, whether it
    is the step's last round), while the next round decodes where the backend can (`background`). Counts go
    to `m`; the rollout rates, timings and the monitor dump (`dump_to`: rank 0 on dump steps) are complete
    once the generator is exhausted."""
    backend.sync_weights(step)  # before the clock: rollout_generate_s is decode time (a no-op when synced)
    t0 = time.perf_counter()
    chunks = backend.generate_chunks(
        [s.prompt_ids for s in samples], step=step, background=background, **image_kwargs(samples)
    )
    items: list = []
    gen_s = parse_s = 0.0
    done = 0
    try:
        for idx, rollouts in chunks:
            gen_s = time.perf_counter() - t0  # when the last round arrived: the decode wall time
            t1 = time.perf_counter()
            segments = rollouts_to_segments([samples[i] for i in idx], rollouts, codec, m, items, cb)
            parse_s += time.perf_counter() - t1
            done += len(idx)
            yield segments, done == len(samples)
    finally:
        chunks.close()
    _finish(m, step, codec, items, cb.monitor, dump_to, gen_s=gen_s, wait_s=chunks.wait_s, parse_s=parse_s)


def rollouts_to_segments(
    samples: list[SampleInput], rollouts: list, codec, m: StepMetrics, items: list, cb: ChannelBSettings
) -> list:
    """Segments of the samples that train; drops and rollout counters go to `m`, (sample, rollout, segment)
    to `items`."""
    segments = []
    for sample, ro in zip(samples, rollouts):
        seg = rollout_to_segment(sample, ro, codec, cb)
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


def _finish(
    m: StepMetrics,
    step: int,
    codec,
    items: list,
    monitor: MonitorSettings,
    dump_to,
    *,
    gen_s: float,
    wait_s: float,
    parse_s: float,
) -> None:
    """Step-level rollout rates, the monitor dump and the timings (wait = the learner blocked on rollouts)."""
    _rollout_rates(m)
    if dump_to is not None:
        write_dump(dump_to, step, monitor, codec, items)
    m.time("time/rollout_generate_s", gen_s)
    m.time("time/rollout_wait_s", wait_s)
    m.time("time/rollout_parse_match_s", parse_s)
    m.add_ratio("rollout/gen_tokens_per_s", m.finalize().get("rollout/gen_new_tokens", 0.0), gen_s)


def rollout_to_segment(sample: SampleInput, ro, codec, cb: ChannelBSettings):
    """One rollout → Segment (or Drop): the whole Channel-B target recipe for a single sample."""
    if list(ro.prompt_ids) != list(sample.prompt_ids):
        # The engine decoded from another prompt than the one we would train on (e.g. an image expanded
        # twice): learning that completion under our prompt would be silently off-policy. Drop and count.
        return Drop(
            "prompt_mismatch",
            sample.sample_id,
            f"engine prompt {len(ro.prompt_ids)} ids, learner {len(sample.prompt_ids)}",
            meta={"rollout/samples": 1.0, "rollout/prompt_mismatch": 1.0},
        )
    parse = parse_rollout(ro.completion_ids, codec)
    match = match_boxes(
        [o.bbox for o in parse.objects],
        [o["bbox_2d"] for o in sample.gt_objects],
        gate=cb.match.maskiou_gate,
        **match_kwargs(cb.match),
    )
    seg = build_channel_b_segment(
        sample.prompt_ids,
        parse,
        sample.gt_objects,
        match,
        codec,
        field_order=cb.field_order,
        ordering=cb.ordering,
        desc_ce_weight=cb.desc_ce_weight,
        drop_invalid_struct_ce_multiplier=cb.drop_invalid_struct_ce_multiplier,
        sample_id=sample.sample_id,
        max_len=cb.max_len,
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
    m.add_ratio(
        "rollout/matched_maskiou_mean", s.get("rollout/matched_maskiou_sum", 0.0), s.get("rollout/matched", 0.0)
    )
    m.add_ratio("rollout/rollout_len_mean", s.get("rollout/rollout_len", 0.0), samples)
