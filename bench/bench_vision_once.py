"""The two image double works, closed (docs/VLM.md, "Images once"): old path vs new, measured in ONE run
(same machine, same load), the compared paths interleaved, medians of --repeat.

    python bench/bench_vision_once.py [--profile smoke/vlm_ab_mixed] [--samples 8] [--softctx-iter 2] [--repeat 7]

1. Channel-B (HF backend): the learner's forward/backward of a step's packs when it opens and patches the
   images again (old: the packs carry no pixel inputs) vs when it trains on the pixel inputs the rollout
   already made (new). The rollout is decoded once; its own patching is the same in both paths.
2. Channel-A: `softctx_logits` forward/backward of the step's packs when every soft-context pass re-runs the
   vision tower (old) vs once per pack (new).

The model is the profile's (the smoke VLM profiles: a tiny Qwen-VL on small rendered images, fp32 on CPU),
so the figures measure the overhead saved on a tiny tower, not a real model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def paired(fns: dict, repeat: int) -> dict:
    """name → median seconds; the callables run interleaved, so load drift hits all alike."""
    times: dict = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def setup(profile: str, n_samples: int, softctx_iter: int | None):
    """The profile's model, vision processor, learner, codec and the first n train samples."""
    import torch
    from transformers import AutoModelForImageTextToText

    from toolkit.config import load_profile
    from toolkit.data.tokenizer import load_tokenizer
    from toolkit.rollout.codec import HFTokenCodec
    from toolkit.trainer.samples import load_samples
    from toolkit.trainer.step import StepLearner
    from toolkit.vlm.inputs import VisionProcessor

    sets = [f"stage2_ab.n_softctx_iter={softctx_iter}"] if softctx_iter else []
    cfg = load_profile(profile, sets)
    d = cfg.data
    tok, vision = load_tokenizer(cfg.model.model), VisionProcessor(cfg.model.model)
    samples = load_samples(
        d.train_jsonl,
        tok,
        limit=n_samples,
        system=cfg.template.system_prompt,
        vision=vision,
        image_root=d.image_root,
        bbox_format=d.bbox_format,
        poly_policy=d.poly_policy,
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(cfg.model.model, dtype=torch.float32)
    codec = HFTokenCodec(tok)
    learner = StepLearner.from_config(
        cfg, torch.tensor(codec.coord_token_ids), "cpu", vision=vision, mrope=(vision.pad_id, vision.merge)
    )
    return cfg, tok, vision, model, codec, learner, samples


def channel_b_packs(cfg, tok, vision, model, codec, learner, samples) -> tuple[list, float]:
    """One HF-backend rollout of the samples → the step's packs (carrying the rollout's pixel inputs), decode s."""
    from toolkit.rollout.backends.build import build_backend
    from toolkit.trainer.channel_b import ChannelBSettings, channel_b_rounds
    from toolkit.trainer.metrics import StepMetrics

    backend = build_backend(cfg, codec, kind="hf", module=model, pad_id=tok.pad_token_id, vision=vision)
    t0 = time.perf_counter()
    rounds = channel_b_rounds(
        backend, samples, 0, codec, StepMetrics(), ChannelBSettings.from_config(cfg), background=False
    )
    segments = [seg for segs, _ in rounds for seg in segs]
    return learner.packer().add(segments, last=True), time.perf_counter() - t0


def channel_a_packs(cfg, codec, learner, samples) -> list:
    from toolkit.rollout.targets import Drop, build_channel_a_segment
    from toolkit.trainer.channel_b import with_images

    t = cfg.template
    segs = [
        with_images(
            build_channel_a_segment(
                s.prompt_ids,
                s.gt_objects,
                codec,
                field_order=t.object_field_order,
                ordering=t.object_ordering,
                desc_ce_weight=cfg.stage2_ab.desc_ce_weight,
                sample_id=s.sample_id,
                max_len=cfg.global_max_length,
            ),
            s,
        )
        for s in samples
    ]
    return learner.packer().add([s for s in segs if not isinstance(s, Drop)], last=True)


def learn(loss_fn, model, packs) -> None:
    """Forward + backward of every pack (no optimizer step: both paths see the same weights)."""
    for pack in packs:
        loss, _ = loss_fn(model, pack)
        loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="smoke/vlm_ab_mixed")
    ap.add_argument("--samples", type=int, default=8, help="raw samples of the step (the smoke profiles' E)")
    ap.add_argument("--softctx-iter", type=int, default=None, help="n_softctx_iter (default: the profile's)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    from unittest import mock

    from toolkit.trainer import channel_a

    cfg, tok, vision, model, codec, learner, samples = setup(args.profile, args.samples, args.softctx_iter)
    b_new, decode_s = channel_b_packs(cfg, tok, vision, model, codec, learner, samples)
    b_old = [dataclasses.replace(p, pixels=None) for p in b_new]  # the learner opens and patches them again
    a_packs = channel_a_packs(cfg, codec, learner, samples)
    every_pass = mock.patch.object(channel_a, "encode_images_once", lambda _model, kwargs: dict(kwargs))

    def a_old():
        with every_pass:
            learn(learner.loss_a, model, a_packs)

    m = paired(
        {
            "b_old": lambda: learn(learner.loss_b, model, b_old),
            "b_new": lambda: learn(learner.loss_b, model, b_new),
            "a_old": a_old,
            "a_new": lambda: learn(learner.loss_a, model, a_packs),
        },
        args.repeat,
    )
    n_b = sum(p.n_segments for p in b_new)
    rows = [
        ("B rollout (HF, once; patches the images) s", decode_s),
        (f"B learner, images patched again s ({n_b} segments, {len(b_new)} packs)", m["b_old"]),
        ("B learner, rollout's pixel inputs s", m["b_new"]),
        ("B saved per trained sample ms", 1e3 * (m["b_old"] - m["b_new"]) / max(n_b, 1)),
        (f"A learner, tower every pass s (n_softctx_iter {learner.n_softctx_iter}, {len(a_packs)} packs)", m["a_old"]),
        ("A learner, tower once per pack s", m["a_new"]),
    ]
    ratios = [
        ("B learner new / old", m["b_new"] / m["b_old"]),
        ("B step (rollout + learner) new / old", (decode_s + m["b_new"]) / (decode_s + m["b_old"])),
        ("A learner new / old", m["a_new"] / m["a_old"]),
    ]
    print(
        f"# bench_vision_once: {args.profile}, {len(samples)} samples, median of {args.repeat}, "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )
    for name, value in rows + [("# ratios", None)] + ratios:
        print(name if value is None else f"{name:66s} {value:10.4f}")


if __name__ == "__main__":
    main()
