"""--set overrides, path resolution and the frozen ResolvedConfig."""

from __future__ import annotations

import os
from dataclasses import FrozenInstanceError

import pytest
from _config_helpers import REPO, load_errors, write

from toolkit.config import ConfigError, load_profile, resolve_profile_path
from toolkit.config.overrides import parse_override
from toolkit.config.yamlio import dump_yaml

SERVERS = 'rollout_matching.vllm.server.servers=[{base_url: "http://127.0.0.1:9000", group_port: 51300}]'


def test_set_parses_yaml_list_value():
    cfg = load_profile("prod/ab_mixed", [SERVERS])
    [server] = cfg.rollout_matching.vllm.server.servers
    assert (server.base_url, server.group_port) == ("http://127.0.0.1:9000", 51300)
    assert cfg.overrides == (SERVERS,)


def test_set_scalars_index_and_float():
    cfg = load_profile(
        "prod/ab_mixed",
        [
            "training.learning_rate=1e-5",
            "rollout_matching.vllm.server.servers[0].group_port=52000",
            "stage2_ab.schedule.b_ratio=0.1",
        ],
    )
    assert cfg.training.learning_rate == 1e-5 and cfg.stage2_ab.schedule.b_ratio == 0.1
    assert cfg.rollout_matching.vllm.server.servers[0].group_port == 52000


def test_unknown_key_via_set_gives_the_same_error_with_set_location():
    err = load_errors("smoke/ab_mixed", ["rollout_matching.decoding.topp=0.9"])
    [issue] = err.issues
    assert issue.file == "--set" and issue.line is None
    assert "did you mean 'top_p'" in issue.message
    assert str(issue).startswith("--set: rollout_matching.decoding.topp: unknown key")


def test_bad_value_via_set():
    [issue] = load_errors("smoke/ab_mixed", ["training.effective_batch_size=eight"]).issues
    assert issue.file == "--set" and "got str 'eight'" in issue.message


@pytest.mark.parametrize("text", ["no_equals", "a..b=1", "a.b[x]=1", "a=[1"])
def test_malformed_override(text):
    with pytest.raises(ValueError):
        parse_override(text)


def test_set_index_beyond_list_fails():
    [issue] = load_errors("prod/ab_mixed", ["rollout_matching.vllm.server.servers[3].group_port=52000"]).issues
    assert "does not exist" in issue.message


def test_set_path_is_relative_to_cwd(tmp_path):
    cfg = load_profile("smoke/ab_mixed", ["data.train_jsonl=mine/train.jsonl"], cwd=tmp_path)
    assert cfg.data.train_jsonl == str(tmp_path / "mine" / "train.jsonl")
    assert cfg.data.val_jsonl == str(REPO / "assets" / "data" / "val.jsonl")


def test_profile_paths_are_relative_to_project_root(project, tmp_path):
    leaf = project / "configs" / "stage2_ab" / "smoke" / "a_only.yaml"
    cfg = load_profile(leaf, cwd=tmp_path)
    assert cfg.project_root == project
    assert cfg.training.output_dir == str(project / "output" / "stage2_ab" / "smoke" / "a_only")
    assert cfg.model.model == "assets/stage1"  # not there yet: kept as written (could be a hub id)
    (project / "assets" / "stage1").mkdir(parents=True)
    assert load_profile(leaf, cwd=tmp_path).model.model == str(project / "assets" / "stage1")


def test_null_means_defaults_are_filled(minimal, tmp_path):
    cfg = load_profile(minimal)
    assert cfg.training.vit_lr == cfg.training.aligner_lr == 1e-5
    assert cfg.data.image_root is None  # null: each records file's images resolve against its own directory
    assert cfg.rollout_matching.vllm.server.infer_timeout_s == cfg.rollout_matching.vllm.server.timeout_s


def test_hub_id_model_is_kept(minimal):
    assert load_profile(minimal).model.model == "some-org/some-model"


def test_profile_names_and_paths(tmp_path, monkeypatch):
    assert resolve_profile_path("prod/ab_mixed") == REPO / "configs/stage2_ab/prod/ab_mixed.yaml"
    assert resolve_profile_path("smoke/a_only.yaml") == REPO / "configs/stage2_ab/smoke/a_only.yaml"
    rel = os.path.relpath(REPO / "configs/stage2_ab/prod/b_only.yaml", tmp_path)
    assert resolve_profile_path(rel, cwd=tmp_path) == REPO / "configs/stage2_ab/prod/b_only.yaml"
    with pytest.raises(ConfigError) as info:
        resolve_profile_path("prod/nope")
    assert "prod/a_only" in str(info.value) and "smoke/ab_mixed" in str(info.value)


def test_resolved_config_is_frozen():
    cfg = load_profile("smoke/ab_mixed")
    with pytest.raises(FrozenInstanceError):
        cfg.training = None
    with pytest.raises(FrozenInstanceError):
        cfg.training.learning_rate = 1.0
    with pytest.raises(AttributeError, match="no config key"):
        _ = cfg.training.learning_rat
    assert isinstance(cfg.training.report_to, tuple)
    d = cfg.to_dict()
    d["training"]["learning_rate"] = 5.0
    assert cfg.training.learning_rate == 1e-4
    with pytest.raises(FrozenInstanceError):
        cfg.settings.decode.decode_batch_size = 99
    assert cfg.settings.decode.decode_batch_size == 4


def test_resolved_dict_reloads_to_the_same_config(tmp_path):
    cfg = load_profile("prod/ab_mixed", world_size=2)
    path = write(tmp_path / "resolved.yaml", cfg.to_yaml())
    again = load_profile(path, world_size=2)
    assert again.to_dict() == cfg.to_dict() and again.derived == cfg.derived


def test_settings_resolve_null_means_defaults_and_keep_engine_nulls():
    s = load_profile("smoke/ab_mixed").settings
    assert s.vllm.max_num_seqs is None and s.vllm.kv_cache_gb is None  # null stays null: vLLM's default applies
    assert s.server.infer_timeout_s == 240.0  # null means timeout_s
    assert s.packing.enabled is True and s.packing.length == 1024
    assert (s.packing.buffer, s.packing.min_fill_ratio) == (256, 0.5)


def test_to_yaml_header_lists_overrides_and_derived():
    text = load_profile("smoke/ab_mixed", ["training.seed=3"], world_size=2).to_yaml()
    assert "# --set training.seed=3" in text and "gradient_accumulation_steps=4" in text
    assert dump_yaml({"a": 1}) == "a: 1\n"
