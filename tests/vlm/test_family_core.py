"""The learner invariants of test_vlm_core.py on the tiny Qwen2.5-VL and Qwen3-VL: M-RoPE rows equal
transformers' `get_rope_index` (Qwen3-VL: interleaved sections), a packed row gives each segment its
unpacked logits, soft-context vision rows stay bitwise (Qwen3-VL: with DeepStack features injected), the
grid from the record size equals the processor's (Qwen3-VL: patch 16)."""

from __future__ import annotations

import pytest
import torch
from _vlm_families import NEW_FAMILIES, family_dir, load_hf
from test_vlm_core import (  # noqa: F401  (pytest collects the imported tests with the fixture below)
    attn,
    segments,
    test_expand_gives_one_pad_per_merged_patch_and_collapse_undoes_it,
    test_mrope_rows_equal_hf_get_rope_index,
    test_packed_row_gives_each_segment_its_unpacked_logits,
    test_soft_context_keeps_vision_rows_and_placeholders_bitwise,
    test_soft_context_runs_the_vision_tower_once_with_the_same_logits_and_gradients,
)


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def vlm(request):
    from toolkit.vlm.inputs import VisionProcessor

    torch.manual_seed(0)
    d = family_dir(request.param)
    return load_hf(d), VisionProcessor(d)
