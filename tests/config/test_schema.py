"""The strict schema: typos at every depth with path, position and did-you-mean; no coercion;
YAML 1.2 scalars; duplicate keys; every error of a file in one run."""

from __future__ import annotations

import pytest
from _config_helpers import MINIMAL, by_path, load_errors, write

from toolkit.config import load_profile
from toolkit.config.rules import all_rules

TYPO_PROFILE = (
    MINIMAL.replace("global_max_length: 1024", "global_max_lenght: 1024")
    + """\
  channel_b:
    drop_invalid_struct_ce_multiplyer: 2.0
rollout_matching:
  rollout_backend: vllm
  decoding:
    topp: 0.9
  vllm:
    mode: server
    max_model_len: 4096
    server:
      servers:
        - base_url: http://127.0.0.1:8000
          group_prot: 51216
"""
)


def test_typos_at_every_depth_in_one_run(tmp_path):
    path = write(tmp_path / "typo.yaml", TYPO_PROFILE)
    err = load_errors(path)
    lines = path.read_text().splitlines()
    expected = {
        "global_max_lenght": ("global_max_length", "global_max_lenght"),
        "stage2_ab.channel_b.drop_invalid_struct_ce_multiplyer": (
            "drop_invalid_struct_ce_multiplier",
            "drop_invalid_struct_ce_multiplyer",
        ),
        "rollout_matching.decoding.topp": ("top_p", "topp"),
        "rollout_matching.vllm.server.servers[0].group_prot": ("group_port", "group_prot"),
    }
    issues = by_path(err)
    for key_path, (suggestion, written) in expected.items():
        [issue] = issues[key_path]
        assert f"did you mean '{suggestion}'" in issue.message
        assert issue.fix == f"rename it to {suggestion}"
        # line:col points at the offending key in the file
        assert lines[issue.line - 1][issue.col - 1 :].startswith(written)
        assert str(issue).startswith(f"{path}:{issue.line}:{issue.col}: {key_path}: ")
    # the renamed keys are also missing: required global_max_length, servers[0].group_port
    assert "global_max_length" in issues and "rollout_matching.vllm.server.servers[0].group_port" in issues
    # the count is the rule table's own size (every cross-field rule, the dispatched per-backend ones included)
    n_rules = len(all_rules())
    assert n_rules > 0 and err.notes == [f"{n_rules} cross-field rules skipped until the errors above are fixed"]


def test_misplaced_key_suggests_its_section(tmp_path):
    path = write(
        tmp_path / "p.yaml",
        MINIMAL.replace("  effective_batch_size: 8", "  effective_batch_size: 8\n  decode_batch_size: 4"),
    )
    [issue] = load_errors(path).issues
    assert issue.key_path == "training.decode_batch_size"
    assert "rollout_matching.decode_batch_size" in issue.message


def test_quoted_number_is_an_error_naming_expected_and_received(tmp_path):
    path = write(tmp_path / "p.yaml", MINIMAL.replace("learning_rate: 1.0e-5", "learning_rate: '1e-5'"))
    [issue] = load_errors(path).issues
    assert issue.key_path == "training.learning_rate"
    assert "expected float > 0" in issue.message and "got str '1e-5'" in issue.message
    assert "without quotes" in issue.fix


@pytest.mark.parametrize("text,value", [("1e-5", 1e-5), ("2E3", 2000.0), ("1.5e-4", 1.5e-4), (".5", 0.5), ("3", 3.0)])
def test_yaml_floats_without_dot_resolve(tmp_path, text, value):
    path = write(tmp_path / "p.yaml", MINIMAL.replace("learning_rate: 1.0e-5", f"learning_rate: {text}"))
    assert load_profile(path).training.learning_rate == value


def test_yaml_no_is_a_string_not_false(tmp_path):
    text = MINIMAL.replace("  effective_batch_size: 8", "  effective_batch_size: 8\n  eval_strategy: no")
    path = write(tmp_path / "p.yaml", text)
    assert load_profile(path).training.eval_strategy == "no"
    bad = write(tmp_path / "q.yaml", MINIMAL.replace("enabled: false", "enabled: yes"))
    [issue] = load_errors(bad).issues
    assert issue.key_path == "deepspeed.enabled" and "got str 'yes'" in issue.message


def test_bool_is_not_an_int(tmp_path):
    path = write(tmp_path / "p.yaml", MINIMAL.replace("effective_batch_size: 8", "effective_batch_size: true"))
    [issue] = load_errors(path).issues
    assert "expected int ≥ 1, got bool True" in issue.message


def test_duplicate_keys_are_errors(tmp_path):
    path = write(tmp_path / "p.yaml", MINIMAL.replace("  run_name: t", "  run_name: t\n  run_name: u"))
    [issue] = load_errors(path).issues
    assert issue.key_path == "training.run_name" and "duplicate key" in issue.message
    assert issue.line == 8 and "first defined at line 7" in issue.message


def test_yaml_syntax_error_has_position(tmp_path):
    path = write(tmp_path / "p.yaml", "model: [1, 2\n")
    [issue] = load_errors(path).issues
    assert issue.line is not None and "YAML syntax error" in issue.message


def test_enum_near_miss_suggests_value(tmp_path):
    path = write(
        tmp_path / "p.yaml",
        MINIMAL.replace("  effective_batch_size: 8", "  effective_batch_size: 8\n  lr_scheduler_type: cosin"),
    )
    [issue] = load_errors(path).issues
    assert "did you mean 'cosine'" in issue.message and issue.fix == "use 'cosine'"


def test_required_keys_missing_all_reported(tmp_path):
    path = write(tmp_path / "p.yaml", "model:\n  model: x\n")
    err = load_errors(path)
    missing = {i.key_path for i in err.issues}
    assert {"data", "training", "deepspeed", "global_max_length", "stage2_ab"} <= missing
    assert all(i.message == "required key is missing" for i in err.issues)


def test_b_ratio_required_and_ranged(tmp_path):
    path = write(tmp_path / "p.yaml", MINIMAL.replace("    b_ratio: 0.5", "    b_ratio: 1.5"))
    [issue] = load_errors(path).issues
    assert issue.key_path == "stage2_ab.schedule.b_ratio" and "in [0, 1]" in issue.message
    path = write(tmp_path / "q.yaml", MINIMAL.replace("  schedule:\n    b_ratio: 0.5", "  schedule: {}"))
    [issue] = load_errors(path).issues
    assert issue.key_path == "stage2_ab.schedule.b_ratio" and issue.message == "required key is missing"


def test_unknown_deepspeed_config_lists_available(tmp_path):
    path = write(tmp_path / "p.yaml", MINIMAL.replace("enabled: false", "enabled: true\n  config: zero5"))
    [issue] = load_errors(path).issues
    assert "available: zero0, zero1, zero2, zero3, zero3_offload" in issue.message


def test_list_items_all_reported(tmp_path):
    text = (
        MINIMAL
        + """\
rollout_matching:
  vllm:
    server:
      servers:
        - {base_url: 1, group_port: 80}
        - 5
        - {base_url: http://h:1, group_port: 2000, extra: 1}
"""
    )
    err = load_errors(write(tmp_path / "p.yaml", text))
    assert set(by_path(err)) == {
        "rollout_matching.vllm.server.servers[0].base_url",
        "rollout_matching.vllm.server.servers[0].group_port",
        "rollout_matching.vllm.server.servers[1]",
        "rollout_matching.vllm.server.servers[2].extra",
    }


def test_str_of_config_error_is_sorted_one_per_line(tmp_path):
    err = load_errors(write(tmp_path / "typo.yaml", TYPO_PROFILE))
    lines = str(err).splitlines()
    issue_lines = [line for line in lines if "cross-field rules skipped" not in line]
    assert len(issue_lines) == len(err.issues)
    positions = [(i.line or 0, i.col or 0) for i in err.issues]
    assert positions == sorted(positions)
    assert "MultipleInvalid" not in str(err) and "extra keys not allowed" not in str(err)
