"""Channel-A soft self-context: forward contract, bitwise embedding rows, CE/geometry pass routing, grad modes."""

import pytest
import torch
from _pack_helpers import COORD_IDS, VOCAB, make_segment, make_tiny_qwen2
from torch import nn

from toolkit.trainer.channel_a import softctx_logits
from toolkit.trainer.losses import LossWeights, pack_loss
from toolkit.trainer.packing import collate_pack

CE_ONLY = LossWeights(bbox_smoothl1_weight=0.0, bbox_ciou_weight=0.0, coord_gate_weight=0.0)
GEO_ONLY = LossWeights(coord_gate_weight=0.0)


def _pack(seeds=(1, 2)):
    return collate_pack([make_segment(s, prompt_len=3, n_boxes=1 + s % 2) for s in seeds])


def _record_calls(model):
    calls = []

    def hook(module, args, kwargs):
        calls.append({"args": args, "kwargs": dict(kwargs), "grad": torch.is_grad_enabled()})

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("n_iter", [1, 2, 3])
def test_forward_count_and_call_contract(n_iter):
    model = make_tiny_qwen2()
    calls = _record_calls(model)
    batch = _pack()
    first, last = softctx_logits(model, batch, COORD_IDS, n_iter, 1.0, "unroll")
    assert len(calls) == n_iter
    for c in calls:
        kw = c["kwargs"]
        assert c["args"] == () and kw.get("input_ids") is None and "past_key_values" not in kw
        assert kw["use_cache"] is False and "attention_mask" not in kw
        assert kw["inputs_embeds"].shape == (1, batch.length, 64)
        assert torch.equal(kw["position_ids"], batch.position_ids)
        assert torch.equal(kw["logits_to_keep"], batch.logit_rows)  # logits only where the loss reads them
    assert first.shape == (1, batch.logit_rows.numel(), VOCAB)
    assert (first is last) == (n_iter == 1)


def test_n1_equals_plain_teacher_forced_forward():
    model = make_tiny_qwen2()
    batch = _pack()
    first, _ = softctx_logits(model, batch, COORD_IDS, 1, 1.0, "em_detach")
    plain = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    assert torch.equal(first, plain[:, batch.logit_rows])


def test_only_coord_rows_change_across_iterations():
    model = make_tiny_qwen2()
    calls = _record_calls(model)
    batch = _pack()
    softctx_logits(model, batch, COORD_IDS, 3, 0.7, "unroll")
    embeds = [c["kwargs"]["inputs_embeds"][0].detach() for c in calls]
    slots = set(batch.coord_pos.tolist())
    other = [i for i in range(batch.length) if i not in slots]
    coord = sorted(slots)
    for e in embeds[1:]:
        assert torch.equal(e[other], embeds[0][other])  # prompt and non-coord rows: bitwise
        assert not torch.equal(e[coord], embeds[0][coord])
    assert not torch.equal(embeds[1][coord], embeds[2][coord])
    # Iteration 0 is exactly the ground-truth embedding.
    assert torch.equal(embeds[0], model.get_input_embeddings()(batch.input_ids)[0].detach())


def test_soft_embedding_is_expected_coord_embedding():
    model = make_tiny_qwen2()
    calls = _record_calls(model)
    batch = _pack()
    tau = 0.5
    first, _ = softctx_logits(model, batch, COORD_IDS, 2, tau, "em_detach")
    table = model.get_input_embeddings().weight[COORD_IDS]
    slot_rows = torch.searchsorted(batch.logit_rows, batch.coord_pos - 1)
    probs = torch.softmax(first[0, slot_rows][:, COORD_IDS] / tau, dim=-1)
    expected = probs @ table
    got = calls[1]["kwargs"]["inputs_embeds"][0, batch.coord_pos]
    assert torch.allclose(got, expected, atol=1e-6)


def test_packed_softctx_matches_each_segment_alone():
    model = make_tiny_qwen2("sdpa").eval()
    segs = [make_segment(s, prompt_len=4, n_boxes=1 + s % 2) for s in (5, 6, 7)]
    with torch.no_grad():
        packed_first, packed_last = softctx_logits(model, collate_pack(segs), COORD_IDS, 3, 1.0, "unroll")
        start = 0
        for seg in segs:
            f, last = softctx_logits(model, collate_pack([seg]), COORD_IDS, 3, 1.0, "unroll")
            n = f.shape[1]  # the segment's logit rows
            assert (packed_first[0, start : start + n] - f[0]).abs().max() <= 1e-5
            assert (packed_last[0, start : start + n] - last[0]).abs().max() <= 1e-5
            start += n


class ScriptedLM(nn.Module):
    """A stand-in LM whose k-th forward returns scripted logits ("good" = mass on the right next token)."""

    def __init__(self, batch, script):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.bias = nn.Parameter(torch.zeros(()))
        self.script = list(script)
        ids = batch.input_ids[0]
        good = torch.full((batch.length, VOCAB), -5.0)
        good[torch.arange(batch.length - 1), ids[1:]] = 5.0  # row t-1 predicts token t
        bad = torch.full((batch.length, VOCAB), -5.0)
        bad[torch.arange(batch.length - 1), (ids[1:] + 500) % VOCAB] = 5.0
        self.table = {"good": good, "bad": bad}

    def get_input_embeddings(self):
        return self.embed

    def forward(self, inputs_embeds, position_ids, use_cache, logits_to_keep):
        kind = self.script.pop(0)
        out = self.table[kind][None, logits_to_keep] + self.bias + 0.0 * inputs_embeds.sum()
        return type("Out", (), {"logits": out})()


@pytest.mark.parametrize("grad_mode", ["unroll", "em_detach"])
def test_ce_from_first_pass_geometry_from_last(grad_mode):
    batch = _pack()
    good_first = softctx_logits(ScriptedLM(batch, ["good", "bad"]), batch, COORD_IDS, 2, 1.0, grad_mode)
    bad_first = softctx_logits(ScriptedLM(batch, ["bad", "good"]), batch, COORD_IDS, 2, 1.0, grad_mode)
    _, p_good_first = pack_loss(*good_first, batch, COORD_IDS, LossWeights())
    _, p_bad_first = pack_loss(*bad_first, batch, COORD_IDS, LossWeights())
    assert p_good_first["loss/ce"] < p_bad_first["loss/ce"]
    assert p_good_first["loss/bbox_smoothl1"] > p_bad_first["loss/bbox_smoothl1"]


def test_em_detach_first_pass_ce_has_gradient():
    model = make_tiny_qwen2()
    calls = _record_calls(model)
    batch = _pack()
    first, last = softctx_logits(model, batch, COORD_IDS, 3, 1.0, "em_detach")
    assert [c["grad"] for c in calls] == [True, False, True]
    loss, _ = pack_loss(first, last, batch, COORD_IDS, CE_ONLY)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum().item() for g in grads) > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_unroll_backpropagates_through_soft_context_em_detach_does_not():
    batch = _pack()
    for mode, expect_flow in (("unroll", True), ("em_detach", False)):
        model = make_tiny_qwen2()
        calls = _record_calls(model)
        first, last = softctx_logits(model, batch, COORD_IDS, 2, 1.0, mode)
        assert all(c["grad"] for c in calls)
        first.retain_grad()
        loss, _ = pack_loss(first.detach(), last, batch, COORD_IDS, GEO_ONLY)
        loss.backward()
        flowed = first.grad is not None and first.grad.abs().sum().item() > 0
        assert flowed == expect_flow, mode


def test_outer_no_grad_records_nothing():
    model = make_tiny_qwen2()
    calls = _record_calls(model)
    with torch.no_grad():
        first, last = softctx_logits(model, _pack(), COORD_IDS, 2, 1.0, "unroll")
    assert not first.requires_grad and not last.requires_grad
    assert [c["grad"] for c in calls] == [False, False]


def test_argument_errors():
    model = make_tiny_qwen2()
    batch = _pack()
    with pytest.raises(ValueError, match="n_softctx_iter"):
        softctx_logits(model, batch, COORD_IDS, 0, 1.0, "unroll")
    with pytest.raises(ValueError, match="softctx_grad_mode"):
        softctx_logits(model, batch, COORD_IDS, 2, 1.0, "detach")
    with pytest.raises(ValueError, match="softctx_temperature"):
        softctx_logits(model, batch, COORD_IDS, 2, 0.0, "unroll")
