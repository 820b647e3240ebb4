"""CLI: --help everywhere, exit codes 0/1/2, stdout carries only data, --format json, preflight JSON."""

from __future__ import annotations

import json

import pytest
from _config_helpers import REPO, write
from click.testing import CliRunner

from launchers.cli import lint_profiles, main
from toolkit.config import load_profile
from toolkit.preflight import PREFLIGHT_SCHEMA, PreflightError, build_preflight, validate_preflight

COMMANDS = [[], ["lint-profiles"], ["config"], ["preflight"]]


def run(args, **kw):
    return CliRunner().invoke(main, args, catch_exceptions=False, **kw)


@pytest.mark.parametrize("args", COMMANDS)
def test_help_of_every_command(args):
    result = run(args + ["--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output


def test_alias_help():
    result = CliRunner().invoke(lint_profiles, ["--help"], prog_name="stage2-lint-profiles")
    assert result.exit_code == 0 and "stage2-lint-profiles" in result.output


def test_lint_clean_exit_0_and_summary_on_stderr():
    result = run(["lint-profiles", str(REPO / "configs")])
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "linted 8 profiles and 2 parents: 0 errors, 0 warnings" in result.stderr


def test_lint_findings_exit_1_with_position_lines(project):
    leaf = project / "configs" / "stage2_ab" / "smoke" / "a_only.yaml"
    leaf.write_text(leaf.read_text().replace("n_softctx_iter: 2", "n_softctx_iterz: 2"))
    result = run(["lint-profiles", str(project / "configs")])
    assert result.exit_code == 1
    [line] = [ln for ln in result.stdout.splitlines() if "n_softctx_iterz" in ln]
    assert line.startswith(f"{leaf}:") and ": error: stage2_ab.n_softctx_iterz: unknown key" in line
    assert "did you mean 'n_softctx_iter'" in line


def test_lint_json(project):
    result = run(["lint-profiles", "--format", "json", str(project / "configs")])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["summary"] == {"profiles": 8, "parents": 2, "errors": 0, "warnings": 0}
    assert len(data["profiles"]) == 8


def test_lint_usage_errors_exit_2(tmp_path):
    assert run(["lint-profiles"]).exit_code == 2
    assert run(["lint-profiles", str(tmp_path / "missing")]).exit_code == 2
    assert run(["lint-profiles", "--format", "xml", str(REPO / "configs")]).exit_code == 2


def test_lint_dir_without_profiles_exit_1(tmp_path):
    result = run(["lint-profiles", str(tmp_path)])
    assert result.exit_code == 1 and "no configs/ directory" in result.stdout


def test_config_prints_loadable_yaml(tmp_path):
    result = run(["config", "--profile", "smoke/ab_mixed", "--world-size", "2"])
    assert result.exit_code == 0 and result.stderr == ""
    path = write(tmp_path / "r.yaml", result.stdout)
    assert load_profile(path, world_size=2).derived.gradient_accumulation_steps == 4


def test_config_settings_and_derived():
    result = run(["config", "-p", "smoke/ab_mixed", "--settings"])
    assert result.exit_code == 0 and "packing:\n  enabled: true\n  length: 1024" in result.stdout
    result = run(["config", "-p", "smoke/ab_mixed", "--derived", "--world-size", "4"])
    assert "gradient_accumulation_steps: 2" in result.stdout


def test_config_set_list_value_and_errors():
    servers = 'rollout_matching.vllm.server.servers=[{base_url: "http://127.0.0.1:9000", group_port: 51300}]'
    result = run(["config", "-p", "prod/ab_mixed", "--set", servers])
    assert result.exit_code == 0 and "base_url: http://127.0.0.1:9000" in result.stdout
    result = run(["config", "-p", "prod/ab_mixed", "--set", "rollout_matching.vllm.server.base_url=http://x:1"])
    assert result.exit_code == 1 and result.stdout == ""
    assert "--set: rollout_matching.vllm.server.base_url: legacy key" in result.stderr


def test_config_usage_errors_exit_2():
    assert run(["config"]).exit_code == 2  # --profile missing
    assert run(["config", "-p", "smoke/ab_mixed", "--set", "novalue"]).exit_code == 2
    assert run(["config", "-p", "smoke/ab_mixed", "--world-size", "0"]).exit_code == 2


def test_config_unknown_profile_exit_1():
    result = run(["config", "-p", "prod/abmixed"])
    assert result.exit_code == 1 and "prod/ab_mixed" in result.stderr


def test_config_warning_goes_to_stderr():
    result = run(["config", "-p", "smoke/ab_mixed", "--set", "training.per_device_eval_batch_size=2"])
    assert result.exit_code == 0 and "warning:" in result.stderr and "warning" not in result.stdout


def test_preflight_one_json_line():
    result = run(["preflight", "-p", "prod/ab_mixed", "--gpus", "0,1", "--server-gpus", "2,3"])
    assert result.exit_code == 0
    [line] = result.stdout.splitlines()
    data = json.loads(line)
    assert data["rollout_backend"] == "vllm" and data["vllm_mode"] == "server"
    assert data["server_base_urls"] == ["http://127.0.0.1:8000"] and data["group_ports"] == [51216]
    assert (data["learner_world_size"], data["gradient_accumulation_steps"]) == (2, 28)
    assert data["server_model"] == "/models/stage1/qwen3vl-4b-stage1-merged"
    assert data["profile"] == str(REPO / "configs/stage2_ab/prod/ab_mixed.yaml")


def test_preflight_cpu_nproc():
    data = json.loads(run(["preflight", "-p", "smoke/ab_mixed", "--gpus", "cpu", "--nproc", "2"]).stdout)
    assert data["learner_world_size"] == 2 and data["learner_gpus"] == "cpu"
    assert data["vllm_mode"] is None and data["server_base_urls"] == [] and data["decode_batch_size"] == 4


@pytest.mark.parametrize(
    "args,code,text",
    [
        (["--gpus", "0,1", "--server-gpus", "1,2"], 1, "disjoint"),
        (["--gpus", "0,0"], 2, "distinct"),
        (["--gpus", "0,1", "--nproc", "3"], 1, "disagrees"),
        (["--gpus", "a"], 2, "comma-separated"),
    ],
)
def test_preflight_placement_errors(args, code, text):
    result = run(["preflight", "-p", "prod/ab_mixed"] + args)
    assert result.exit_code == code and text in result.stderr


def test_preflight_server_gpus_need_server_mode():
    result = run(["preflight", "-p", "smoke/ab_mixed", "--server-gpus", "2"])
    assert result.exit_code == 1 and "--server-gpus needs rollout_backend: vllm" in result.stderr


def test_preflight_indivisible_world_size_is_a_config_error():
    result = run(["preflight", "-p", "smoke/ab_mixed", "--gpus", "0,1,2"])
    assert result.exit_code == 1 and "2" in result.stderr and "1 × 3 = 3" in result.stderr


@pytest.mark.parametrize("field", sorted(str(k) for k in PREFLIGHT_SCHEMA.schema))
def test_preflight_schema_missing_field_is_named(field):
    contract = build_preflight(load_profile("prod/ab_mixed"))
    contract.pop(field)
    with pytest.raises(PreflightError, match=f"preflight field '{field}': missing"):
        validate_preflight(contract)


def test_preflight_schema_invalid_fields():
    contract = build_preflight(load_profile("prod/ab_mixed"))
    with pytest.raises(PreflightError, match="'rollout_backend'"):
        validate_preflight({**contract, "rollout_backend": "tgi"})
    with pytest.raises(PreflightError, match="'server_base_urls'"):
        validate_preflight({**contract, "server_base_urls": [], "group_ports": []})
    with pytest.raises(PreflightError, match="'vllm_mode'"):
        validate_preflight({**contract, "vllm_mode": None})


def test_lazy_subcommand_imported_only_when_needed(tmp_path, monkeypatch):
    import sys

    from launchers import cli

    write(
        tmp_path / "lazy_dummy_cmd.py",
        '''
import click

@click.command()
def cmd():
    """A dummy subcommand."""
    click.echo("dummy ran")
''',
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.LAZY_SUBCOMMANDS, "dummy", "lazy_dummy_cmd:cmd")
    assert "lazy_dummy_cmd" not in sys.modules
    assert run(["config", "--help"]).exit_code == 0
    assert "lazy_dummy_cmd" not in sys.modules  # other commands do not load it
    result = run(["--help"])
    assert "dummy" in result.output and "A dummy subcommand." in result.output
    assert run(["dummy"]).output == "dummy ran\n"
    monkeypatch.delitem(sys.modules, "lazy_dummy_cmd")
