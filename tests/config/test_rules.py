"""Cross-field rules: effective batch divisibility, derived GA, decode batch override, backend and
vllm.mode dispatch, sync mode vs world size."""

from __future__ import annotations

import pytest
from _config_helpers import MINIMAL, by_path, load_errors, write

from toolkit.config import derive, load_profile
from toolkit.config.rules import all_rules

VLLM_SERVER = """\
rollout_matching:
  rollout_backend: vllm
  vllm:
    mode: server
    max_model_len: 4096
    server:
      servers:
        - {base_url: "http://127.0.0.1:8000", group_port: 51216}
"""


def profile(tmp_path, extra_training: str = "", tail: str = "", ebs: int = 8):
    text = MINIMAL.replace("effective_batch_size: 8", f"effective_batch_size: {ebs}{extra_training}")
    return write(tmp_path / "p.yaml", text + tail)


def test_indivisible_effective_batch_names_every_factor(tmp_path):
    path = profile(tmp_path, "\n  per_device_train_batch_size: 2", ebs=10)
    [issue] = load_errors(path, world_size=2).issues
    assert issue.key_path == "training.effective_batch_size"
    for text in ("effective_batch_size=10", "per_device_train_batch_size × learner_world_size", "2 × 2 = 4"):
        assert text in issue.message
    assert "8 or 12" in issue.fix
    assert (issue.line, issue.col) == (11, 3)


def test_divisible_effective_batch_derives_gradient_accumulation(tmp_path):
    cfg = load_profile(profile(tmp_path, "\n  per_device_train_batch_size: 2"), world_size=2)
    assert cfg.derived.gradient_accumulation_steps == 2
    assert cfg.training.gradient_accumulation_steps == 2
    assert cfg.derived.per_rank_samples_per_step == 4 and cfg.derived.rollouts_per_step == 8


def test_explicit_conflicting_gradient_accumulation_fails(tmp_path):
    path = profile(tmp_path, "\n  gradient_accumulation_steps: 3")
    [issue] = load_errors(path).issues
    assert issue.key_path == "training.gradient_accumulation_steps"
    assert "gradient_accumulation_steps=3" in issue.message and "8 / (1 × 1)" in issue.message
    assert (
        load_profile(profile(tmp_path, "\n  gradient_accumulation_steps: 8")).derived.gradient_accumulation_steps == 8
    )


def test_effective_batch_size_is_required(tmp_path):
    path = write(tmp_path / "p.yaml", MINIMAL.replace("  effective_batch_size: 8\n", ""))
    [issue] = load_errors(path).issues
    assert issue.key_path == "training.effective_batch_size" and issue.message == "required key is missing"


def test_decode_batch_size_overrides_eval_batch_with_warning(tmp_path):
    tail = "rollout_matching:\n  decode_batch_size: 4\n"
    cfg = load_profile(profile(tmp_path, "\n  per_device_eval_batch_size: 2", tail))
    assert cfg.derived.decode_batch_size == cfg.derived.eval_batch_size == 4
    assert cfg.training.per_device_eval_batch_size == 4
    assert cfg.settings.decode.decode_batch_size == 4
    [warning] = cfg.warnings
    assert warning.severity == "warning" and warning.key_path == "training.per_device_eval_batch_size"


def test_decode_batch_size_defaults_to_one_without_warning(tmp_path):
    cfg = load_profile(profile(tmp_path))
    assert cfg.derived.decode_batch_size == 1 and cfg.warnings == []


def test_server_mode_needs_servers(tmp_path):
    tail = VLLM_SERVER.replace('        - {base_url: "http://127.0.0.1:8000", group_port: 51216}\n', "").replace(
        "      servers:\n", "      servers: []\n"
    )
    [issue] = load_errors(profile(tmp_path, tail=tail)).issues
    assert issue.key_path == "rollout_matching.vllm.server.servers" and "empty" in issue.message


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "http://127.0.0.1", "ftp://h:1", "http://:80"])
def test_server_urls_need_scheme_host_port(tmp_path, url):
    tail = VLLM_SERVER.replace("http://127.0.0.1:8000", url)
    [issue] = load_errors(profile(tmp_path, tail=tail)).issues
    assert issue.key_path == "rollout_matching.vllm.server.servers[0].base_url"


def test_server_port_clash(tmp_path):
    tail = VLLM_SERVER + '        - {base_url: "http://127.0.0.1:51216", group_port: 51300}\n'
    [issue] = load_errors(profile(tmp_path, tail=tail)).issues
    assert issue.key_path == "rollout_matching.vllm.server.servers[1].base_url" and "51216" in issue.message


def test_hf_backend_ignores_vllm_section(tmp_path):
    tail = VLLM_SERVER.replace("rollout_backend: vllm", "rollout_backend: hf").replace("    max_model_len: 4096\n", "")
    cfg = load_profile(profile(tmp_path, tail=tail))
    assert cfg.rollout_matching.rollout_backend == "hf"


def test_vllm_needs_max_model_len(tmp_path):
    tail = VLLM_SERVER.replace("    max_model_len: 4096\n", "")
    [issue] = load_errors(profile(tmp_path, tail=tail)).issues
    assert issue.key_path == "rollout_matching.vllm.max_model_len" and "not set" in issue.message


def test_vllm_mode_null_means_colocate(tmp_path):
    tail = "rollout_matching:\n  rollout_backend: vllm\n  vllm:\n    mode: null\n    max_model_len: 4096\n"
    assert load_profile(profile(tmp_path, tail=tail)).rollout_matching.vllm.mode == "colocate"


@pytest.mark.parametrize("mode", ["adapter", "auto"])
def test_sync_mode_must_be_full_with_several_learners(tmp_path, mode):
    tail = VLLM_SERVER + f"    enable_lora: true\n    sync:\n      mode: {mode}\ntuner:\n  train_type: lora\n"
    assert load_profile(profile(tmp_path, tail=tail)).derived.vllm_sync_mode == "adapter"
    [issue] = load_errors(profile(tmp_path, tail=tail), world_size=2).issues
    assert issue.key_path == "rollout_matching.vllm.sync.mode" and "learner world size is 2" in issue.message


def test_adapter_sync_needs_lora(tmp_path):
    tail = VLLM_SERVER + "    sync:\n      mode: adapter\n"
    [issue] = load_errors(profile(tmp_path, tail=tail)).issues
    assert "tuner.train_type: lora" in issue.message


def test_deepspeed_enabled_needs_config(tmp_path):
    path = write(tmp_path / "p.yaml", MINIMAL.replace("enabled: false", "enabled: true"))
    [issue] = load_errors(path).issues
    assert issue.key_path == "deepspeed.config"


def test_eval_steps_needs_val_data(tmp_path):
    path = write(tmp_path / "p.yaml", MINIMAL.replace("  val_jsonl: data/val.jsonl\n", ""))
    [issue] = load_errors(path).issues
    assert issue.key_path == "training.eval_strategy"


def test_sampling_needs_temperature(tmp_path):
    tail = "rollout_matching:\n  decode_mode: sample\n"
    [issue] = load_errors(profile(tmp_path, tail=tail)).issues
    assert issue.key_path == "rollout_matching.decoding.temperature"


def test_several_rule_errors_in_one_run(tmp_path):
    tail = VLLM_SERVER.replace("    max_model_len: 4096\n", "")
    path = profile(tmp_path, "\n  gradient_accumulation_steps: 3\n  per_device_train_batch_size: 3", tail)
    err = load_errors(path)
    assert set(by_path(err)) == {"training.effective_batch_size", "rollout_matching.vllm.max_model_len"}
    # gradient_accumulation_steps is only checked once the division is exact


def test_schema_failure_skips_rules_with_a_count(tmp_path):
    path = profile(tmp_path, "\n  unknown_knob: 1", ebs=7)
    err = load_errors(path, world_size=2)
    assert [i.key_path for i in err.issues] == ["training.unknown_knob"]
    assert err.notes == [f"{len(all_rules())} cross-field rules skipped until the errors above are fixed"]


def test_derive_is_exact():
    cfg = {
        "training": {"effective_batch_size": 10, "per_device_train_batch_size": 2},
        "rollout_matching": {
            "decode_batch_size": 4,
            "rollout_backend": "vllm",
            "vllm": {"mode": "server", "sync": {"mode": "full"}},
        },
    }
    with pytest.raises(ValueError, match="2 × 2 = 4"):
        derive(cfg, 2)
    assert derive(cfg, 5).gradient_accumulation_steps == 1 and derive(cfg, 5).server_mode


def test_packing_buffer_must_hold_one_ranks_step(tmp_path):
    path = profile(tmp_path, "\n  packing_buffer: 3")
    [issue] = load_errors(path, world_size=2).issues
    assert issue.key_path == "training.packing_buffer"
    assert "8 / 2 = 4" in issue.message and "at least 4" in issue.fix
    assert load_profile(profile(tmp_path, "\n  packing_buffer: 4"), world_size=2).training.packing_buffer == 4
