"""What a new user meets in the first hour: messages, not tracebacks, through the installed commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _e2e_runs import ROOT
from _shared import child_env, free_port

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def stage2(*args: str, tool: str = "stage2", extra_env: dict | None = None, timeout: int = 300):
    e = {**child_env(), **(extra_env or {})}
    return subprocess.run([str(BIN / tool), *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def test_train_takes_dash_p_and_a_typo_gets_did_you_mean():
    assert "--profile, -p" in stage2("train", "--help").stdout or "-p, --profile" in stage2("train", "--help").stdout
    typo = stage2("trian")
    assert typo.returncode == 2 and "Did you mean 'train'?" in typo.stderr


def test_completion_offers_profile_names_and_set_keys():
    words = {"COMP_WORDS": "stage2 train -p smoke/ab", "COMP_CWORD": "3", "_STAGE2_COMPLETE": "bash_complete"}
    assert "plain,smoke/ab_mixed" in stage2(extra_env=words).stdout.splitlines()
    words = {
        "COMP_WORDS": "stage2 config --set training.max_st",
        "COMP_CWORD": "3",
        "_STAGE2_COMPLETE": "bash_complete",
    }
    assert stage2(extra_env=words).stdout.splitlines() == ["plain,training.max_steps="]


def test_a_missing_model_folder_or_records_file_stops_before_anything_starts(tmp_path):
    res = stage2(
        "train",
        "-p",
        "smoke/a_only",
        "--set",
        f"model.model={tmp_path}/no/model",
        "--set",
        f"data.train_jsonl={tmp_path}/none.jsonl",
        "--set",
        f"training.output_dir={tmp_path}/run",
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert (
        f"model.model: no folder {tmp_path}/no/model" in res.stderr and f"no file {tmp_path}/none.jsonl" in res.stderr
    )
    launch = stage2(
        "-p", "prod/ab_mixed", "--gpus", "cpu", "--set", f"training.output_dir={tmp_path}/run", tool="stage2-launch"
    )
    assert launch.returncode == 1 and "model.model: no folder /models/" in launch.stderr
    assert not (tmp_path / "run" / "logs").exists()  # no server was started


def test_launch_refuses_gpu_ids_on_a_machine_without_gpus(tmp_path):
    if Path("/proc/driver/nvidia/gpus").is_dir():
        pytest.skip("this machine has NVIDIA GPUs")
    e = {k: v for k, v in child_env().items() if k != "CUDA_VISIBLE_DEVICES"}
    res = subprocess.run(
        [
            str(BIN / "stage2-launch"),
            "-p",
            "smoke/ab_mixed",
            "--gpus",
            "0,1",
            "--set",
            f"training.output_dir={tmp_path}",
        ],
        cwd=ROOT,
        env={**e, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1 and "no visible NVIDIA GPU" in res.stderr and "--gpus cpu" in res.stderr
    assert not (tmp_path / "logs").exists()


def test_server_mode_says_what_it_waits_for_and_fails_with_the_message_alone(tmp_path):
    port = free_port()
    res = stage2(
        "train",
        "-p",
        "smoke/b_only",
        "--set",
        "rollout_matching.rollout_backend=vllm",
        "--set",
        f"rollout_matching.vllm.server.servers=[{{base_url: 'http://127.0.0.1:{port}', group_port: 51999}}]",
        "--set",
        "rollout_matching.vllm.server.timeout_s=20",
        "--set",
        f"training.output_dir={tmp_path}",
    )
    assert res.returncode == 1
    said = res.stderr.find(
        f"rollouts come from http://127.0.0.1:{port}; once the model is loaded the run waits up to 20 s"
    )
    # said at start-up, before the engine (model, DeepSpeed) is built; the wait itself starts with its own line
    assert (
        0
        <= said
        < res.stderr.index("toolkit.trainer.engine")
        < res.stderr.index(
            f"waiting up to 20 s for http://127.0.0.1:{port}/health/ (rollout_matching.vllm.server.timeout_s)"
        )
    )
    assert "stage2 serve" in res.stderr and "still waiting for" in res.stderr
    assert f"Error: rollout server http://127.0.0.1:{port} is not healthy after 20 s" in res.stderr
    assert "Traceback" not in res.stderr and "[rank0]:" not in res.stderr


def test_outside_the_venv_the_entry_point_says_which_python_to_use():
    system = "/usr/bin/python3"
    if not os.path.exists(system) or subprocess.run([system, "-c", "import voluptuous"]).returncode == 0:
        pytest.skip("needs a python3 without the project's packages")
    res = subprocess.run(
        [system, "-m", "toolkit.train", "--profile", "smoke/a_only"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "No module named" in res.stderr and ".venv/bin/python -m toolkit.train" in res.stderr


def test_the_sbatch_wrapper_without_stage2_launch_on_path_says_which_venv_to_activate(tmp_path):
    script = f"source {ROOT}/launchers/slurm/stage2_common.sh; stage2_cd_repo; echo reached"
    e = {"PATH": "/usr/bin:/bin", "STAGE2_REPO": str(ROOT), "HOME": str(tmp_path)}
    res = subprocess.run(["bash", "-c", script], env=e, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "reached" not in res.stdout
    assert f"source {ROOT}/.venv/bin/activate" in res.stderr and "'stage2-launch' is not on PATH" in res.stderr


def test_a_partial_asset_build_into_an_empty_folder_names_the_missing_part(tmp_path):
    res = subprocess.run(
        [sys.executable, "assets/build_assets.py", "--only", "vlm_model", "--out", str(tmp_path)],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "vlm_model needs the tokenizer part first" in res.stderr and "--only tokenizer,vlm_model" in res.stderr


def test_launch_checks_the_run_folder_before_starting_anything_and_overwrite_moves_it(tmp_path):
    import json

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    sets = [
        "--set",
        f"training.output_dir={out}",
        "--set",
        "training.max_steps=1",
        "--set",
        "training.eval_strategy=no",
    ]
    taken = stage2("-p", "smoke/a_only", "--gpus", "cpu", *sets, tool="stage2-launch")
    assert taken.returncode == 1 and "already holds another run" in taken.stderr and "--overwrite" in taken.stderr
    assert not (out / "logs").exists()  # refused before any process started
    dry = stage2("-p", "smoke/a_only", "--gpus", "cpu", *sets, "--overwrite", "--dry-run", tool="stage2-launch")
    assert json.loads(dry.stdout)["run_folder"] == [f"--overwrite: would move {out} aside"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'  # a dry run moves nothing
    run = stage2("-p", "smoke/a_only", "--gpus", "cpu", *sets, "--overwrite", tool="stage2-launch", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    moved = list(tmp_path.glob("run.old-*"))
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert "(newest step-000001)" in run.stderr


def test_the_launch_summary_does_not_repeat_a_failures_log_tail(tmp_path):
    from types import SimpleNamespace

    from launchers.launch_cmd import summary_line

    reason = (
        f"server0 exited with code 1 before becoming healthy; see {tmp_path}/logs/server0.log\n"
        "  last lines of the log:\n    OSError: Repo id"
    )
    line = summary_line(SimpleNamespace(output_dir=tmp_path), 1, 3.0, reason)
    assert "server0 exited with code 1" in line and "last lines" not in line and "OSError" not in line


def test_vllms_harmless_chat_template_warmup_traceback_becomes_one_explained_line():
    import logging

    from toolkit.rollout.vllm_engine import _ChatWarmupNote

    try:
        raise ValueError("template needs the detector prompt")
    except ValueError:
        import sys as _sys

        record = logging.LogRecord(
            "vllm.renderers.base", logging.WARNING, "base.py", 380, "Chat template warmup failed", (), _sys.exc_info()
        )
    assert _ChatWarmupNote().filter(record)
    text = logging.Formatter().format(record)
    assert "harmless" in text and "Traceback" not in text and "\n" not in text
