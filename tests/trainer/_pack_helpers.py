"""Test helpers for the trainer math tests: a tiny random Qwen2 causal LM and synthetic segments.

Imported by module name (pytest puts this directory on sys.path), so `pytest` and `python -m pytest` both work.
"""

import torch

VOCAB = 1100
COORD_OFFSET = 100  # coord bin k is token id COORD_OFFSET + k
COORD_IDS = list(range(COORD_OFFSET, COORD_OFFSET + 1000))


def make_tiny_qwen2(attn_implementation: str = "sdpa", seed: int = 0, **config):
    """`config`: Qwen2Config fields on top of the tiny defaults."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tiny = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    cfg = Qwen2Config(**{**tiny, **config}, attn_implementation=attn_implementation)
    model = Qwen2ForCausalLM(cfg).float()
    assert model.config._attn_implementation == attn_implementation
    return model


def make_segment(
    seed: int, prompt_len: int = 5, n_boxes: int = 1, text_per_box: int = 2, group: str = "fn", channel: str = "A"
):
    """A synthetic segment: random prompt, then per box `text_per_box` text tokens and 4 coord tokens, then an end
    token."""
    from toolkit.data.segment import Segment

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, COORD_OFFSET, (prompt_len,), generator=g).tolist()
    weights = [0.0] * prompt_len
    coord_pos, coord_bins = [], []
    for _ in range(n_boxes):
        ids += torch.randint(0, COORD_OFFSET, (text_per_box,), generator=g).tolist()
        weights += [1.0] * text_per_box
        lo = torch.randint(0, 500, (2,), generator=g).tolist()
        hi = torch.randint(500, 1000, (2,), generator=g).tolist()
        for b in (lo[0], lo[1], hi[0], hi[1]):
            coord_pos.append(len(ids))
            coord_bins.append(b)
            ids.append(COORD_OFFSET + b)
            weights.append(0.0)
    ids.append(7)  # stands in for <|im_end|>
    weights.append(1.0)
    return Segment(
        input_ids=ids,
        prompt_len=prompt_len,
        ce_weights=weights,
        coord_pos=coord_pos,
        coord_bins=coord_bins,
        box_groups=[group] * n_boxes,
        channel=channel,
        sample_id=f"s{seed}",
    )
