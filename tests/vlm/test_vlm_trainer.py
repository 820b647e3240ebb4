"""The trainer's image plumbing: samples from image records, the per-sample prompt-parity check, a VLM run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from _shared import ROOT, tiny_vlm_dir

from toolkit.config import load_profile
from toolkit.data.tokenizer import load_tokenizer
from toolkit.rollout.backends.base import Rollout
from toolkit.rollout.codec import HFTokenCodec
from toolkit.rollout.targets import Drop
from toolkit.trainer.channel_b import ChannelBSettings, rollouts_to_segments
from toolkit.trainer.metrics import StepMetrics
from toolkit.trainer.samples import load_samples
from toolkit.vlm.images import collapse_image_pads

VLM_DATA = ROOT / "assets" / "vlm" / "data"


@pytest.fixture(scope="module")
def vlm_samples():
    from toolkit.vlm.inputs import VisionProcessor

    d = tiny_vlm_dir()
    tok = load_tokenizer(d)
    vision = VisionProcessor(d)
    return tok, vision, load_samples(str(VLM_DATA / "val.jsonl"), tok, limit=4, vision=vision)


def test_image_records_become_expanded_prompts_with_absolute_images(vlm_samples):
    tok, vision, samples = vlm_samples
    assert len(samples) == 4
    for s in samples:
        assert s.images and all(Path(p).is_absolute() and Path(p).is_file() for p in s.images)
        n_pads = sum(vision.tokens_per_image(g) for g in s.image_grids)
        assert s.prompt_ids.count(vision.pad_id) == n_pads > 1
        text = tok.decode(collapse_image_pads(s.prompt_ids, vision.pad_id))
        assert "<|vision_start|><|image_pad|><|vision_end|>" in text
        assert s.gt_objects and all(len(o["bbox_2d"]) == 4 for o in s.gt_objects)


def test_text_model_refuses_image_records_clearly(vlm_samples):
    tok, _, _ = vlm_samples
    with pytest.raises(ValueError, match="has images but the model has no vision tower"):
        load_samples(str(VLM_DATA / "val.jsonl"), tok, limit=1, vision=None)


def test_prompt_mismatch_is_dropped_and_counted_never_trained(vlm_samples):
    """A rollout decoded from another prompt (here: the image expanded twice, what vLLM does to an
    already-expanded prompt) is dropped with a metric; the matching one trains."""
    tok, vision, samples = vlm_samples
    cfg = load_profile("smoke/vlm_ab_mixed")
    codec = HFTokenCodec(tok)
    good, bad = samples[:2]
    answer = codec.encode(
        '{"object_1": {"desc": "circle", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_300|>", "<|coord_400|>"]}}'
    ) + [codec.im_end_id]
    pads = bad.prompt_ids.count(vision.pad_id)
    doubled = vision.expand(bad.prompt_ids, bad.image_grids * pads)  # every pad expanded again
    assert len(doubled) > len(bad.prompt_ids)
    rollouts = [Rollout(list(good.prompt_ids), answer, "stop"), Rollout(doubled, answer, "stop")]
    m, items = StepMetrics(), []
    cb = dataclasses.replace(ChannelBSettings.from_config(cfg), ordering="sorted")
    segs = rollouts_to_segments([good, bad], rollouts, codec, m, items, cb)
    assert [s.sample_id for s in segs] == [good.sample_id]
    assert segs[0].images == good.images and segs[0].image_grids == good.image_grids
    assert isinstance(items[1][2], Drop) and items[1][2].reason == "prompt_mismatch"
    counts = m.finalize()
    assert counts["stage2/drop/prompt_mismatch"] == 1 and counts["rollout/prompt_mismatch"] == 1
    assert counts["rollout/samples"] == 2


def test_channel_b_opens_and_patches_each_image_once_per_step(vlm_samples, monkeypatch):
    """HF backend: a Channel-B step reads and patches each sample's image once (for the rollout) and the
    learner's packs train on those very pixel inputs; the real functions are wrapped, not replaced."""
    import collections

    import torch
    from _vlm_families import family_dir
    from transformers import AutoModelForImageTextToText

    from toolkit.rollout.backends.build import build_backend
    from toolkit.trainer.channel_b import ChannelBSettings, channel_b_rounds
    from toolkit.trainer.step import StepLearner
    from toolkit.vlm import inputs

    tok, vision, samples = vlm_samples
    cfg = load_profile("smoke/vlm_ab_mixed")
    codec = HFTokenCodec(tok)
    model = AutoModelForImageTextToText.from_pretrained(str(family_dir("qwen2_vl", stage1=True)), dtype=torch.float32)
    opened, patched = collections.Counter(), collections.Counter()
    real_open, real_pixels = inputs.open_image, vision.pixels
    monkeypatch.setattr(inputs, "open_image", lambda path: (opened.update([path]), real_open(path))[1])
    monkeypatch.setattr(vision, "pixels", lambda paths: (patched.update(paths), real_pixels(paths))[1])

    backend = build_backend(cfg, codec, kind="hf", module=model, pad_id=tok.pad_token_id, vision=vision)
    rounds = channel_b_rounds(
        backend, samples, 0, codec, StepMetrics(), ChannelBSettings.from_config(cfg), background=False
    )
    segments = [seg for segs, _ in rounds for seg in segs]
    assert segments and all(s.pixels is not None for s in segments)
    coord_ids = torch.tensor(codec.coord_token_ids)
    learner = StepLearner.from_config(cfg, coord_ids, "cpu", vision=vision, mrope=(vision.pad_id, vision.merge))
    packs = learner.packer().add(segments, last=True)
    for pack in packs:
        loss, _ = learner.loss_b(model, pack)
        loss.backward()
    every = collections.Counter(p for s in samples for p in s.images)
    assert opened == patched == every and set(every.values()) == {1}  # once each, rollout and learner together
    for pack in packs:  # the handed-over inputs are what patching the pack's images gives
        again = vision.model_inputs(pack.images)
        assert all(torch.equal(pack.pixels[k], again[k]) for k in again)
