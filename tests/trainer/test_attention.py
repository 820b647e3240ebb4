"""`model.attn_impl: sdpa_packed` (toolkit/trainer/attention.py): per-segment SDPA over a packed row.

It must give what transformers' dense block-causal `sdpa` gives on packs (logits and gradients), each
segment's logits when forwarded alone (tests/trainer/test_packing.py), and exactly transformers' `sdpa`
wherever it is no packed forward (left-padded generate with a KV cache).
"""

import pytest
import torch
from _pack_helpers import make_segment, make_tiny_qwen2

from toolkit.trainer.attention import NAME, register, segment_spans
from toolkit.trainer.packing import collate_pack

register()


def _packed_segments():
    return [make_segment(s, prompt_len=3 + s, n_boxes=1 + s % 3) for s in range(5)]


def test_segment_spans_follow_transformers_segment_rule():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    assert segment_spans(pos, 10, 10, has_mask=False) == [[(0, 3), (3, 5), (5, 6), (6, 10)]]
    # Two rows, each with its own cuts.
    two = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]])
    assert segment_spans(two, 4, 4, has_mask=False) == [[(0, 2), (2, 4)], [(0, 4)]]


@pytest.mark.parametrize(
    "pos, q, kv, has_mask",
    [
        (torch.tensor([[0, 1, 2, 3]]), 4, 4, False),  # one sequence: plain causal sdpa
        (torch.tensor([[0, 1, 0, 1]]), 4, 4, True),  # a padding mask decides
        (torch.tensor([[5]]), 1, 6, False),  # a decode step against a KV cache
        (None, 4, 4, False),  # vision towers pass no position ids
    ],
)
def test_segment_spans_is_none_where_no_packed_forward(pos, q, kv, has_mask):
    assert segment_spans(pos, q, kv, has_mask) is None


def test_packed_logits_and_gradients_equal_dense_block_causal_sdpa():
    segs = _packed_segments()
    batch = collate_pack(segs)
    grads, logits = {}, {}
    for impl in ("sdpa", NAME):
        model = make_tiny_qwen2(impl)
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        (out.float().pow(2).mean() + out[0, :, :50].logsumexp(-1).mean()).backward()
        logits[impl] = out.detach()
        grads[impl] = {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(logits[NAME], logits["sdpa"], atol=1e-6, rtol=1e-5)
    for name, g in grads["sdpa"].items():
        torch.testing.assert_close(grads[NAME][name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_left_padded_generate_is_transformers_sdpa():
    prompts = [[5, 9, 11, 40, 41], [6, 7], [8, 30, 31, 32]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    out = {}
    for impl in ("sdpa", NAME):
        model = make_tiny_qwen2(impl).eval()
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
        out[impl] = gen
    assert torch.equal(out[NAME].sequences, out["sdpa"].sequences)
    for a, b in zip(out[NAME].scores, out["sdpa"].scores):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_sliding_window_layers_get_a_clear_error():
    model = make_tiny_qwen2(NAME, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(ValueError, match="model.attn_impl: sdpa"):
        model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)


def test_saved_checkpoint_loads_without_registration(tmp_path):
    """An exported checkpoint must load where this module was never imported (vLLM, plain transformers)."""
    model = make_tiny_qwen2(NAME)
    model.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()


def test_spans_are_computed_once_per_forward(monkeypatch):
    """Every layer gets the same position ids: the host syncs per forward do not grow with the layers."""
    batch = collate_pack(_packed_segments())
    diffs = []
    real_diff = torch.diff
    monkeypatch.setattr(torch, "diff", lambda *a, **k: diffs.append(1) or real_diff(*a, **k))
    counts = []
    for layers in (1, 4):
        model = make_tiny_qwen2(NAME, num_hidden_layers=layers)
        diffs.clear()
        model(input_ids=batch.input_ids, position_ids=batch.position_ids.clone(), use_cache=False)
        counts.append(len(diffs))
    assert counts[0] == counts[1] >= 1
