"""The VLM invariants on a real Qwen2-VL / Qwen2.5-VL checkpoint (GPU machines).

Set STAGE2_QWEN_VL_DIR to a local checkpoint folder; the model runs in fp32 on the GPU. Re-runs the
architecture-level tests of test_vlm_core.py (M-RoPE rows vs transformers, packed == unpacked logits,
soft-context vision rows bitwise) with this checkpoint instead of the tiny one.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_vlm_core import (  # noqa: F401  (pytest collects the imported tests with the fixtures below)
    segments,
    test_mrope_rows_equal_hf_get_rope_index,
    test_packed_row_gives_each_segment_its_unpacked_logits,
    test_soft_context_keeps_vision_rows_and_placeholders_bitwise,
)

pytestmark = pytest.mark.gpu
CHECKPOINT = os.environ.get("STAGE2_QWEN_VL_DIR")


@pytest.fixture(scope="module")
def vlm():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (real Qwen-VL checkpoints are too slow on these CPUs)")
    if not CHECKPOINT:
        pytest.skip("set STAGE2_QWEN_VL_DIR to a local Qwen2-VL / Qwen2.5-VL checkpoint folder")
    from transformers import AutoModelForImageTextToText

    from toolkit.vlm.inputs import VisionProcessor

    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT, dtype=torch.float32).cuda().eval()
    return model, VisionProcessor(CHECKPOINT)
