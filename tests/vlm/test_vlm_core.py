"""The learner's VLM path on the tiny Qwen2-VL: M-RoPE positions, packing, soft self-context, HF rollouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _shared import greedy_settings, shape_images, tiny_vlm_dir

from toolkit.data.segment import Segment
from toolkit.trainer.attention import NAME, register
from toolkit.trainer.channel_a import softctx_logits
from toolkit.trainer.packing import collate_pack
from toolkit.vlm.images import collapse_image_pads
from toolkit.vlm.mrope import segment_mrope


@pytest.fixture(scope="module")
def vlm():
    from transformers import AutoModelForImageTextToText

    from toolkit.vlm.inputs import VisionProcessor

    d = tiny_vlm_dir()
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_pretrained(d).eval(), VisionProcessor(d)


@pytest.fixture(scope="module")
def segments(vlm, tmp_path_factory):
    """Three image segments (different image sizes, so different grids) and one text segment."""
    _, vp = vlm
    words = lambda k: [int(t) for t in np.random.RandomState(k).randint(4, 300, size=12)]  # noqa: E731
    out = []
    for k, path in enumerate(shape_images(tmp_path_factory.mktemp("img"))):
        grids = vp.grids([path])
        ids = vp.expand(words(k)[:5] + [vp.pad_id] + words(k)[5:], grids)
        coords = [len(ids) - 3, len(ids) - 2]  # two "coordinate slots" after the image
        out.append(Segment(ids, 5, [0.0] * len(ids), images=(path,), image_grids=grids))
        out[-1].meta["slots"] = coords
    out.append(Segment(words(9), 2, [0.0] * 12))
    return out


def _single_logits(model, vp, seg):
    """HF's own path for one unpacked sequence: it computes the M-RoPE positions itself."""
    ids = torch.tensor([seg.input_ids], device=model.device)
    kw = vp.model_inputs(seg.images, model.device)
    if kw:
        kw["mm_token_type_ids"] = (ids == vp.pad_id).int()
    return model(input_ids=ids, use_cache=False, **kw).logits[0]


def test_expand_gives_one_pad_per_merged_patch_and_collapse_undoes_it(vlm, segments):
    _, vp = vlm
    seg = segments[0]
    t, h, w = seg.image_grids[0]
    assert seg.input_ids.count(vp.pad_id) == t * h * w // 4 == 16  # 112x112 → 8x8 patches → 16 merged
    collapsed = collapse_image_pads(seg.input_ids, vp.pad_id)
    assert collapsed.count(vp.pad_id) == 1
    assert vp.expand(collapsed, seg.image_grids) == seg.input_ids
    with pytest.raises(ValueError, match="fewer <\\|image_pad\\|>"):
        vp.expand([5, 6], seg.image_grids)
    with pytest.raises(ValueError, match="more <\\|image_pad\\|>"):
        vp.expand(seg.input_ids, seg.image_grids)  # already expanded: 16 pads, one grid


def test_mrope_rows_equal_hf_get_rope_index(vlm, segments):
    model, vp = vlm
    for seg in segments[:3]:
        ids = torch.tensor([seg.input_ids])
        hf, _ = model.model.get_rope_index(ids, (ids == vp.pad_id).int(), image_grid_thw=torch.tensor(seg.image_grids))
        ours = torch.tensor(segment_mrope(seg.input_ids, seg.image_grids, vp.pad_id, vp.merge))
        assert torch.equal(hf[:, 0], ours)
    assert len({seg.image_grids for seg in segments[:3]}) == 3  # three different grids were covered


@pytest.fixture(params=["sdpa", NAME])
def attn(request, vlm):
    """The model's attention switched to transformers' sdpa or to sdpa_packed for one test, then back."""
    model = vlm[0]
    before = model.config._attn_implementation
    register()
    model.set_attn_implementation(request.param)
    yield request.param
    model.set_attn_implementation(before)


def test_packed_row_gives_each_segment_its_unpacked_logits(vlm, segments, attn):
    """Segment-aware M-RoPE (+ the text row for the block mask or sdpa_packed's segments) == running each
    segment alone."""
    model, vp = vlm
    assert model.model.language_model.config._attn_implementation == attn
    pack = collate_pack(segments, mrope=(vp.pad_id, vp.merge))
    assert tuple(pack.position_ids.shape) == (4, 1, sum(len(s) for s in segments))
    assert pack.images == tuple(p for s in segments for p in s.images)
    pack = pack.to(model.device)
    with torch.no_grad():
        packed = model(
            input_ids=pack.input_ids,
            position_ids=pack.position_ids,
            use_cache=False,
            **vp.model_inputs(pack.images, model.device),
        ).logits[0]
        offset = 0
        for seg in segments:
            single = _single_logits(model, vp, seg)
            torch.testing.assert_close(packed[offset : offset + len(seg)], single, atol=1e-5, rtol=0)
            offset += len(seg)
        # Without the per-segment restart the later segments see the wrong positions: the test can fail.
        flat = collate_pack([segments[2]], mrope=None).to(model.device)
        wrong = model(
            input_ids=flat.input_ids,
            position_ids=flat.position_ids,
            use_cache=False,
            **vp.model_inputs(segments[2].images, model.device),
        ).logits[0]
        assert (wrong - _single_logits(model, vp, segments[2])).abs().max() > 1e-3


def _slotted_pack(segs, vp):
    """The segments packed, with their two "coordinate slots" each as the pack's coord_pos."""
    pack = collate_pack(segs, mrope=(vp.pad_id, vp.merge))
    offsets = np.cumsum([0] + [len(s) for s in segs])
    pack.coord_pos = torch.tensor([int(o) + p for o, s in zip(offsets, segs) for p in s.meta["slots"]])
    return pack


@pytest.mark.parametrize("grad_mode", ["unroll", "em_detach"])
def test_soft_context_keeps_vision_rows_and_placeholders_bitwise(vlm, segments, grad_mode):
    """Every pass feeds the language model the very same image features and text rows; only coord slots move."""
    model, vp = vlm
    pack = _slotted_pack(segments[:2], vp)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True
    )
    try:
        coord_ids = list(range(319, 1319))
        softctx_logits(model, pack, coord_ids, 3, 1.0, grad_mode, model_kwargs=vp.model_inputs(pack.images))
    finally:
        hook.remove()
    assert len(seen) == 3
    image_rows = pack.input_ids[0] == vp.pad_id
    slots = torch.zeros_like(image_rows)
    slots[pack.coord_pos] = True
    features = torch.cat(model.model.get_image_features(**vp.model_inputs(pack.images), return_dict=True).pooler_output)
    text_rows = model.get_input_embeddings()(pack.input_ids)[0]
    for it, embeds in enumerate(seen):
        assert torch.equal(embeds[0, image_rows], features.detach())  # vision rows: bitwise, every pass
        keep = ~image_rows & ~slots
        assert torch.equal(embeds[0, keep], text_rows[keep].detach())
        if it > 0:
            assert not torch.equal(embeds[0, slots], text_rows[slots].detach())  # the soft rows did change


def _softctx_step(model, vp, pack, grad_mode):
    """One soft-context call (3 passes) and a backward of a fixed mix of its first and last logits →
    (first, last, every parameter's gradient, vision-tower forwards)."""
    model.zero_grad(set_to_none=True)
    calls = []
    hook = model.model.visual.register_forward_hook(lambda *_: calls.append(1))
    try:
        first, last = softctx_logits(
            model, pack, list(range(319, 1319)), 3, 1.0, grad_mode, model_kwargs=vp.model_inputs(pack.images)
        )
    finally:
        hook.remove()
    mix = torch.randn(first.shape, generator=torch.Generator().manual_seed(0))
    ((first * mix).mean() + (last * mix.flip(-1)).mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return first.detach(), last.detach(), grads, len(calls)


@pytest.mark.parametrize("grad_mode", ["unroll", "em_detach"])
def test_soft_context_runs_the_vision_tower_once_with_the_same_logits_and_gradients(
    vlm, segments, grad_mode, monkeypatch
):
    """The tower's output is computed once per call and reused by every pass: logits and the gradients of
    every parameter (the vision tower's included) equal the old path that re-ran the tower on each pass."""
    from toolkit.trainer import channel_a

    model, vp = vlm
    pack = _slotted_pack(segments[:3], vp)
    first, last, grads, towers = _softctx_step(model, vp, pack, grad_mode)
    with monkeypatch.context() as mp:  # the old path: pixel_values handed to every pass
        mp.setattr(channel_a, "encode_images_once", lambda _model, kwargs: dict(kwargs))
        old_first, old_last, old_grads, old_towers = _softctx_step(model, vp, pack, grad_mode)
    assert (towers, old_towers) == (1, 3)
    torch.testing.assert_close(first, old_first, atol=1e-6, rtol=0)
    torch.testing.assert_close(last, old_last, atol=1e-6, rtol=0)
    assert grads.keys() == old_grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".visual." in n and grads[n].abs().max() > 0 for n in grads)  # the tower does learn
    for name in grads:
        torch.testing.assert_close(grads[name], old_grads[name], atol=1e-6, rtol=0, msg=name)


def test_hf_backend_rollouts_see_the_image(vlm, segments):
    from toolkit.rollout.backends.hf import HFBackend

    model, vp = vlm
    settings = greedy_settings(max_new_tokens=6, decode_batch_size=2, seed=0)
    backend = HFBackend(model, settings, pad_id=0, eos_id=2, vision=vp)
    prompts = [s.input_ids for s in segments[:3]]
    images = [s.images for s in segments[:3]]
    rollouts = backend.generate(prompts, step=0, images=images)
    assert [r.prompt_ids for r in rollouts] == prompts
    for seg, ro in zip(segments[:3], rollouts):  # batched, left-padded == one at a time with HF's processor path
        ids = torch.tensor([seg.input_ids])
        with torch.no_grad():
            ref = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                do_sample=False,
                mm_token_type_ids=(ids == vp.pad_id).int(),
                eos_token_id=2,
                pad_token_id=0,
                **vp.model_inputs(seg.images),
            )[0, ids.shape[1] :].tolist()
        ref = ref[: ref.index(2) + 1] if 2 in ref else ref
        assert ro.completion_ids == ref


def test_lora_wraps_the_language_model_only_and_vision_lrs_decide_the_rest():
    from transformers import AutoModelForImageTextToText

    from toolkit.trainer.export import apply_lora
    from toolkit.trainer.optim import build_optimizer

    model = apply_lora(AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir()), 4, 8, 0.0, "all-linear")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in names if "lora_" in n]
    assert lora and all(".language_model." in n for n in lora)
    opt = build_optimizer(model, 1e-4, vit_lr=0.0, aligner_lr=1e-5)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"llm", "aligner", "aligner_no_decay"}  # vit_lr 0 froze the tower
    assert groups["aligner"]["lr"] == 1e-5
    tower = [p for n, p in model.named_parameters() if ".visual.blocks." in n]
    assert tower and not any(p.requires_grad for p in tower)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".merger." in n)


@pytest.mark.parametrize("size", [(112, 112), (84, 112), (112, 56), (500, 300), (30, 40), (2000, 700)])
def test_grid_from_the_record_size_equals_the_processor_grid(vlm, tmp_path, size):
    """Start-up computes grids from width/height without decoding images; it must be the processor's grid."""
    _, vp = vlm
    path = shape_images(tmp_path, sizes=[size])[0]
    assert vp.grid_for_size(*size) == vp.grids([path])[0]
