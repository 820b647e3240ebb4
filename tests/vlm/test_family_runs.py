"""Two real steps (one A, one B) of each new tiny family through the public entry point on the HF backend:
Qwen2.5-VL via `smoke/vlm_ab_mixed --set model.model=...`, Qwen3-VL via its own profile
`smoke/vlm_qwen3_ab_mixed` (DoRA, tower and aligner trained). Qwen2-VL's runs are tests/e2e/test_vlm_e2e.py;
the vLLM backends' are tests/rollout_vllm/test_vlm_family_runs.py. Also: the early refusal of an
architecture nobody here can run, at `stage2 preflight` and at `stage2 train` start-up."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from _shared import child_env, metrics
from _vlm_families import ROOT, family_dir

FAST = (
    "training.max_steps=2",
    "training.eval_steps=2",
    "training.save_steps=2",
    "rollout_matching.max_new_tokens=48",
    "data.val_sample_limit=4",
    "training.logging_steps=1",
)


def stage2(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from launchers.cli import main; main()", *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train(profile: str, out, *sets: str) -> subprocess.CompletedProcess:
    argv = [
        "train",
        "--profile",
        profile,
        "--set",
        f"training.output_dir={out}",
        "--set",
        f"training.logging_dir={out / 'tb'}",
    ]
    for s in (*FAST, *sets):
        argv += ["--set", s]
    return stage2(*argv)


def check_two_steps(proc, out) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = metrics(out)
    assert [r["channel"] for r in rows] == ["A", "B"]
    a, b = rows
    assert a["stage2/segments"] == 8 and a["loss/total"] > 0
    assert b["rollout/samples"] == 8 and b["rollout/prompt_mismatch_rate"] == 0
    assert b["stage2/segments"] + b["stage2/dropped_samples"] == 8
    return rows


@pytest.mark.e2e
def test_qwen2_5_vl_two_steps_hf(tmp_path):
    check_two_steps(
        train("smoke/vlm_ab_mixed", tmp_path, f"model.model={family_dir('qwen2_5_vl', stage1=True)}"), tmp_path
    )


@pytest.mark.e2e
def test_qwen3_vl_smoke_profile_two_steps_hf_with_dora(tmp_path):
    proc = train("smoke/vlm_qwen3_ab_mixed", tmp_path)
    check_two_steps(proc, tmp_path)
    assert "DoRA r=16 alpha=32" in proc.stderr


@pytest.fixture
def unknown_vlm(tmp_path):
    """A Qwen3-VL folder relabelled as an architecture no backend here serves (Qwen3-VL-MoE)."""
    folder = tmp_path / "moe_vl"
    shutil.copytree(family_dir("qwen3_vl"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["Qwen3VLMoeForConditionalGeneration"], "qwen3_vl_moe"
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_preflight_refuses_an_unknown_vlm_architecture(unknown_vlm, backend):
    proc = stage2(
        "preflight",
        "--profile",
        "smoke/vlm_qwen3_ab_mixed",
        "--set",
        f"model.model={unknown_vlm}",
        "--set",
        f"rollout_matching.rollout_backend={backend}",
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    err = proc.stderr
    assert "Qwen3VLMoeForConditionalGeneration" in err and f"rollout backend {backend}" in err
    assert "fix: point model.model at a checkpoint" in err and "Traceback" not in err


def test_train_refuses_it_before_anything_starts(unknown_vlm, tmp_path):
    proc = train(
        "smoke/vlm_qwen3_ab_mixed",
        tmp_path,
        f"model.model={unknown_vlm}",
        "rollout_matching.rollout_backend=vllm",
        "rollout_matching.vllm.mode=colocate",
    )
    assert proc.returncode == 1 and "Qwen3VLMoeForConditionalGeneration" in proc.stderr
    assert "Traceback" not in proc.stderr and "pydantic" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_vllm_refused_without_torchvision_and_plugin(monkeypatch):
    # The plugin's entry point missing (an environment without `pip install -e .`): vLLM could not import
    # its Qwen-VL modules here, so the vLLM backends are refused; HF still runs.
    from toolkit.vlm import support

    if support.importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: vLLM's own classes serve every family")
    model = str(family_dir("qwen3_vl"))
    support.check_model_support(model, "vllm")
    monkeypatch.setattr(support, "plugin_installed", lambda: False)  # a fault we cannot provoke in the shared venv
    support.check_model_support(model, "hf")
    with pytest.raises(
        support.ModelSupportError,
        match="rollout backend vllm cannot serve architecture Qwen3VLForConditionalGeneration.*fix: `pip install -e .`",
    ):
        support.check_model_support(model, "vllm")


def test_serve_refuses_it_before_any_engine_starts(unknown_vlm):
    proc = stage2(
        "serve",
        "--profile",
        "smoke/vlm_qwen3_ab_mixed",
        "--gpus",
        "cpu",
        "--port",
        "1",
        "--set",
        f"model.model={unknown_vlm}",
        timeout=120,
    )
    assert proc.returncode == 1 and "Qwen3VLMoeForConditionalGeneration" in proc.stderr
    assert "rollout backend vllm" in proc.stderr and "Traceback" not in proc.stderr
    assert "starting" not in proc.stderr  # no DP worker was started
