"""`smoke/vlm_ab_mixed` (tiny Qwen2-VL on rendered shapes) through the public entry point with vLLM rollouts:
colocate here, server mode in test_vlm_server.py (it owns the image server). One A and one B step; the
B step decodes from images and every engine prompt matches the learner's (parity rate 0)."""

import pytest
from _shared import metrics
from _vllm_helpers import run_train

pytestmark = pytest.mark.vllm


def check_vlm_run(proc, out) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    rows = metrics(out)
    assert [r["channel"] for r in rows] == ["A", "B"]
    b = rows[1]
    assert b["rollout/samples"] == 8 and b["rollout/gen_new_tokens"] > 0
    assert b["rollout/prompt_mismatch_rate"] == 0  # the engine saw exactly the learner's expanded prompts
    assert b["stage2/segments"] + b["stage2/dropped_samples"] == 8
    return rows


def test_vlm_smoke_colocate(tmp_path):
    check_vlm_run(run_train("smoke/vlm_ab_mixed", tmp_path, "rollout_matching.vllm.mode=colocate"), tmp_path)
