"""Real training runs through the public entry point (`python -m toolkit.train`, torchrun) on CPU.

Each run is a subprocess with DeepSpeed on gloo, HF rollouts and the committed tiny model, so these
tests exercise the whole recipe: schedule, budget, rollouts, parse/match, packing, engine, checkpoints.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from _e2e_runs import ROOT, run_torchrun, run_train, train_argv
from _shared import child_env, metrics, tiny_model_dir

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("assets"))


def _sets(tiny, *extra):
    return (f"model.model={tiny}", *extra)


def test_resume_reproduces_the_straight_run(tiny, tmp_path):
    """4 steps straight == 2 steps + --resume auto + 2 steps: same losses, schedule and samples."""
    common = _sets(tiny, "training.lr_scheduler_type=constant", "training.save_steps=2", "training.eval_strategy=no")
    straight = run_train("smoke/ab_mixed", tmp_path / "a", *common, "training.max_steps=4")
    assert straight.returncode == 0, straight.stderr[-3000:]
    half = run_train("smoke/ab_mixed", tmp_path / "b", *common, "training.max_steps=2")
    assert half.returncode == 0, half.stderr[-3000:]
    rest = run_train("smoke/ab_mixed", tmp_path / "b", *common, "training.max_steps=4", resume="auto")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "resumed from" in rest.stderr
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["channel"] for r in a] == [r["channel"] for r in b] == ["A", "B", "A", "B"]
    for ra, rb in zip(a, b):
        assert abs(ra["loss/total"] - rb["loss/total"]) <= 1e-6, (ra["step"], ra["loss/total"], rb["loss/total"])
        assert ra["stage2/sample_digest"] == rb["stage2/sample_digest"]
    assert a[1]["rollout/gen_new_tokens"] == b[1]["rollout/gen_new_tokens"]


@pytest.mark.slow  # 75 s; CI keeps the 1-rank resume, the 2-rank run and the uneven-pack equivalence tests
@pytest.mark.dist
def test_two_rank_resume_with_uneven_packs_reproduces_the_straight_run(tiny, tmp_path):
    """2 ranks, packs of ≤ 256 tokens so the ranks pack their samples into different numbers of packs (the
    short rank runs zero-weight padding packs): 4 steps straight == 2 steps + --resume auto + 2 steps."""
    common = _sets(
        tiny,
        "training.lr_scheduler_type=constant",
        "training.save_steps=2",
        "training.eval_strategy=no",
        "global_max_length=256",
    )
    straight = run_torchrun(2, "smoke/ab_mixed", tmp_path / "a", *common, "training.max_steps=4")
    assert straight.returncode == 0, straight.stdout[-3000:]
    half = run_torchrun(2, "smoke/ab_mixed", tmp_path / "b", *common, "training.max_steps=2")
    assert half.returncode == 0, half.stdout[-3000:]
    rest = run_torchrun(2, "smoke/ab_mixed", tmp_path / "b", *common, "training.max_steps=4", resume="auto")
    assert rest.returncode == 0, rest.stdout[-3000:]
    assert "resumed from" in rest.stdout
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]  # optimizer steps completed
    # uneven packs before and after the resume point (a rank with fewer packs pads)
    assert any(r["packing/padding_packs"] > 0 for r in a[:2]) and any(r["packing/padding_packs"] > 0 for r in a[2:])
    for ra, rb in zip(a, b):
        for key in ("loss/total", "train/grad_norm"):
            assert abs(ra[key] - rb[key]) <= 1e-6, (ra["step"], key, ra[key], rb[key])
        for key in ("stage2/sample_digest", "packing/packs", "packing/padding_packs", "stage2/segments"):
            assert ra[key] == rb[key], (ra["step"], key)


def test_two_rank_torchrun_completes_and_sums_the_step_budget(tiny, tmp_path):
    res = run_torchrun(
        2,
        "smoke/ab_mixed",
        tmp_path,
        *_sets(
            tiny,
            "training.max_steps=2",
            "training.save_steps=2",
            "training.eval_steps=2",
            "rollout_matching.monitor_dump.enabled=true",
            "rollout_matching.monitor_dump.every_steps=1",
        ),
    )
    assert res.returncode == 0, res.stdout[-4000:]
    rows = metrics(tmp_path)
    assert [r["channel"] for r in rows] == ["A", "B"]
    assert all(r["stage2/raw_samples"] == 8 for r in rows)  # E=8 over 2 ranks: 4 each, summed once per step
    assert "eval_rollout/f1" in rows[-1]
    assert (tmp_path / "checkpoints" / "step-000002" / "trainer_state.json").is_file()
    # the best metric is named as logged: the eval's value, not the training batch's rollout/f1
    assert f"(best eval_rollout/f1={rows[-1]['eval_rollout/f1']:.4g} at step 2)" in res.stdout
    # rank 0 dumps its Channel-B samples (step 2 is the only B step): rollout, target, supervised tokens
    dump = [json.loads(line) for line in (tmp_path / "monitor_dumps" / "step_000002.jsonl").read_text().splitlines()]
    assert len(dump) == 2 and all("rollout" in d and ("target_supervised" in d or "dropped" in d) for d in dump)
    assert not (tmp_path / "monitor_dumps" / "step_000001.jsonl").exists()  # A steps decode nothing


def test_sigterm_finishes_the_step_checkpoints_and_exits_143(tiny, tmp_path):
    argv = [
        sys.executable,
        *train_argv("smoke/a_only", tmp_path, *_sets(tiny, "training.max_steps=200", "training.eval_strategy=no")),
    ]
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while not metrics(tmp_path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert metrics(tmp_path), "no step finished before the deadline"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    done = len(metrics(tmp_path))
    assert metrics(tmp_path)[-1]["step"] == done  # one numbering: the metrics line, the message, the checkpoint
    assert f"stopping after step {done} on signal 15 (checkpoint step-{done:06d} written)" in err
    state = json.loads((tmp_path / "checkpoints" / f"step-{done:06d}" / "trainer_state.json").read_text())
    assert state["step"] == done < 200


def test_malformed_record_is_a_clear_error_naming_the_line(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = (ROOT / "assets" / "data" / "train.jsonl").read_text().splitlines()[:20]
    bad.write_text(
        "\n".join(
            good[:3] + ['{"id": "x", "scene": "cat", "objects": [{"desc": "cat", "bbox_2d": [5, 1, 2]}]}'] + good[3:]
        )
        + "\n"
    )
    res = run_train("smoke/a_only", tmp_path / "run", *_sets(tiny, f"data.train_jsonl={bad}"))
    assert res.returncode == 1
    assert f"{bad}:4:" in res.stderr and "bbox_2d" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "profile,channels",
    [  # ab_mixed runs both channels in CI; the single-channel profiles are slow-only (CI time, tests/README.md)
        pytest.param("smoke/a_only", ["A", "A"], marks=pytest.mark.slow),
        pytest.param("smoke/b_only", ["B", "B"], marks=pytest.mark.slow),
        ("smoke/ab_mixed", ["A", "B"]),
    ],
)
def test_each_smoke_profile_trains_from_the_stage1_checkpoint(profile, channels, tmp_path):
    """The shipped profiles as they are (assets/stage1), shortened: real matches from the first B step."""
    # answers run to 66 tokens: decode up to 96 (the FAST default of 48 would truncate them)
    res = run_train(
        profile,
        tmp_path,
        "training.max_steps=2",
        "training.eval_steps=2",
        "training.save_steps=2",
        "rollout_matching.max_new_tokens=96",
        "data.val_sample_limit=8",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = metrics(tmp_path)
    assert [r["channel"] for r in rows] == channels
    for r in rows:
        if r["channel"] == "B":
            assert r["rollout/matched"] > 0 and r["rollout/f1"] > 0.3  # the Stage-1 model finds objects
    assert rows[-1]["eval_rollout/valid_json_rate"] > 0.5
    ckpt = tmp_path / "checkpoints" / "step-000002"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "resolved_config.yaml").read_text().startswith("# ")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_lora_run_exports_a_merged_model(tmp_path):
    res = run_train(
        "smoke/b_only",
        tmp_path,
        "training.max_steps=1",
        "training.save_steps=1",
        "training.eval_strategy=no",
        "tuner.train_type=lora",
        "tuner.lora_rank=4",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(tmp_path / "checkpoints" / "step-000001" / "hf" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k for k in keys)
    assert metrics(tmp_path)[0]["loss/total"] > 0
