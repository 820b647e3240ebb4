"""The shipped profiles: every canonical leaf loads, the tree lints clean, the values are the intended ones."""

from __future__ import annotations

import json

import pytest
from _config_helpers import REPO

from toolkit.config import ConfigError, ds_config_names, load_ds_config, load_profile, profile_names, schema
from toolkit.config.lint import lint_targets
from toolkit.data.render import FIELD_ORDERS, OBJECT_ORDERINGS

LEAVES = [
    "prod/a_only",
    "prod/b_only",
    "prod/ab_mixed",
    "smoke/a_only",
    "smoke/b_only",
    "smoke/ab_mixed",
    "smoke/vlm_ab_mixed",
    "smoke/vlm_qwen3_ab_mixed",
]


def test_canonical_names_are_exactly_the_eight_leaves():
    assert sorted(profile_names(REPO)) == sorted(LEAVES)


@pytest.mark.parametrize("name", LEAVES)
def test_every_canonical_leaf_loads(name):
    cfg = load_profile(name)
    assert cfg.warnings == []
    assert cfg.rollout_matching.decode_batch_size == 4
    assert cfg.training.per_device_eval_batch_size == 4
    assert cfg.profile_path == REPO / "configs" / "stage2_ab" / f"{name}.yaml"


def test_whole_configs_tree_lints_clean():
    report = lint_targets([REPO / "configs"])
    assert [str(i) for i in report.issues] == []
    assert len(report.profiles) == 8 and len(report.parents) == 2


@pytest.mark.parametrize(
    "name,b_ratio,ebs", [("prod/a_only", 0.0, 64), ("prod/b_only", 1.0, 64), ("prod/ab_mixed", 0.2, 56)]
)
def test_prod_leaves(name, b_ratio, ebs):
    cfg = load_profile(name)
    assert (cfg.stage2_ab.schedule.b_ratio, cfg.training.effective_batch_size) == (b_ratio, ebs)
    assert cfg.rollout_matching.rollout_backend == "vllm" and cfg.rollout_matching.vllm.mode == "server"
    assert cfg.rollout_matching.vllm.server.servers[0].base_url == "http://127.0.0.1:8000"
    assert cfg.model.model.startswith("/models/")


@pytest.mark.parametrize(
    "name,b_ratio,steps", [("smoke/a_only", 0.0, 20), ("smoke/b_only", 1.0, 20), ("smoke/ab_mixed", 0.5, 100)]
)
def test_smoke_leaves(name, b_ratio, steps):
    cfg = load_profile(name)
    assert cfg.stage2_ab.schedule.b_ratio == b_ratio and cfg.training.max_steps == steps
    assert cfg.rollout_matching.rollout_backend == "hf"
    assert (cfg.global_max_length, cfg.rollout_matching.max_new_tokens) == (1024, 256)
    assert cfg.training.effective_batch_size == 8 and cfg.derived.gradient_accumulation_steps == 8
    assert cfg.deepspeed.config == "zero2"
    short = name.split("/")[1]
    assert cfg.training.output_dir == str(REPO / "output" / "stage2_ab" / "smoke" / short)
    assert cfg.training.logging_dir == str(REPO / "output" / "stage2_ab" / "smoke" / short / "tb")  # follows output_dir
    assert cfg.data.train_jsonl == str(REPO / "assets" / "data" / "train.jsonl")


def test_stage2_base_defaults():
    cfg = load_profile("smoke/ab_mixed")
    rm = cfg.rollout_matching
    assert (rm.candidate_top_k, rm.fp_cost, rm.fn_cost, rm.repeat_terminate.max_object_keys) == (5, 0.5, 2.0, 64)
    assert cfg.training.seed == 17 and cfg.training.metric_for_best_model == "rollout/f1"


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero3_offload"])
def test_ds_configs_hold_engine_settings_only(name):
    data = load_ds_config(name)
    assert "zero_optimization" in data
    assert "train_micro_batch_size_per_gpu" not in data and "gradient_accumulation_steps" not in data
    if name.startswith("zero3"):
        assert data["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert json.loads((REPO / "ds_configs" / f"{name}.json").read_text()) == data


def test_ds_names_and_unknown_name():
    assert ds_config_names() == ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]
    with pytest.raises(ConfigError, match="zero2"):
        load_ds_config("zero9")


def test_schema_enums_match_the_renderer():
    assert schema.FIELD_ORDERS == FIELD_ORDERS and schema.OBJECT_ORDERINGS == OBJECT_ORDERINGS
