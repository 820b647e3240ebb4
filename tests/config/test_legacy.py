"""Legacy keys fail with their own migration message (never a generic unknown-key error) that names
the replacement; the table is checked before the schema."""

from __future__ import annotations

import pytest
import yaml
from _config_helpers import MINIMAL, by_path, load_errors, write

from toolkit.config.legacy import LEGACY, RELOCATION_SUFFIX

REPLACEMENTS = {
    "extra": "custom.extra",
    "custom.train_jsonl": "data.train_jsonl",
    "custom.val_jsonl": "data.val_jsonl",
    "custom.object_field_order": "template.object_field_order",
    "custom.object_ordering": "template.object_ordering",
    "stage2_ab.schedule.pattern": "stage2_ab.schedule.b_ratio",
    "stage2_ab.channel_b.mode": "delete",
    "stage2_ab.channel_b.async": "delete",
    "stage2_ab.channel_b.rollouts_per_step": "training.effective_batch_size",
    "stage2_ab.channel_b.enable_pipeline": "delete",
    "stage2_ab.channel_b.rollout_decode_batch_size": "rollout_matching.decode_batch_size",
    "stage2_ab.channel_b.reordered_gt_sft": "delete",
    "stage2_ab.channel_b.desc_ce_weight_matched": "delete",
    "stage2_ab.channel_b.semantic_desc_gate": "delete",
    "rollout_matching.rollout_generate_batch_size": "rollout_matching.decode_batch_size",
    "rollout_matching.rollout_infer_batch_size": "rollout_matching.decode_batch_size",
    "rollout_matching.post_rollout_pack_scope": "delete",
    "rollout_matching.rollout_buffer": "delete",
    "rollout_matching.temperature": "rollout_matching.decoding.temperature",
    "rollout_matching.top_p": "rollout_matching.decoding.top_p",
    "rollout_matching.top_k": "rollout_matching.decoding.top_k",
    "rollout_matching.vllm.server.base_url": "rollout_matching.vllm.server.servers",
    "rollout_matching.vllm.server.group_port": "rollout_matching.vllm.server.servers",
    "training.packing_length": "global_max_length",
    "stage2_ab.bbox_l1_weight": "stage2_ab.bbox_smoothl1_weight",
    "stage2_ab.bbox_giou_weight": "stage2_ab.bbox_ciou_weight",
}
EXACT = [p for p in LEGACY if not p.endswith(RELOCATION_SUFFIX)]


def _profile_with(tmp_path, dotted: str, value=1):
    data = yaml.safe_load(MINIMAL)
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return write(tmp_path / "legacy.yaml", yaml.safe_dump(data, sort_keys=False))


def test_required_paths_are_in_the_table():
    assert set(REPLACEMENTS) <= set(LEGACY)
    assert "custom.extra.rollout_matching.*" in LEGACY


@pytest.mark.parametrize("dotted", EXACT)
def test_each_legacy_key_fails_with_its_own_message(tmp_path, dotted):
    err = load_errors(_profile_with(tmp_path, dotted))
    issues = by_path(err)[dotted]
    assert len(issues) == 1, [str(i) for i in err.issues]
    issue = issues[0]
    assert issue.message.startswith("legacy key:") and "unknown key" not in issue.message
    assert issue.message != "legacy key:" and issue.fix
    assert issue.line is not None and issue.file.endswith("legacy.yaml")
    if dotted in REPLACEMENTS:
        assert REPLACEMENTS[dotted] in issue.message + " " + issue.fix
    # no second, generic error for the same key
    assert all("unknown key" not in i.message for i in err.issues)


def test_legacy_messages_are_distinct():
    texts = [(e.message, e.fix) for e in LEGACY.values()]
    # a few keys share one migration on purpose (e.g. the two batch-size aliases); most do not
    assert len(set(texts)) >= len(texts) - 6


@pytest.mark.parametrize(
    "sub,new",
    [
        ("decode_batch_size", "rollout_matching.decode_batch_size"),
        ("vllm", "rollout_matching.vllm.server.servers"),
    ],
)
def test_custom_extra_rollout_matching_relocation_names_exact_new_path(tmp_path, sub, new):
    value = (
        4 if sub == "decode_batch_size" else {"server": {"servers": [{"base_url": "http://h:1", "group_port": 2000}]}}
    )
    err = load_errors(_profile_with(tmp_path, f"custom.extra.rollout_matching.{sub}", value))
    [issue] = err.issues
    assert issue.key_path == "custom.extra.rollout_matching." + new.split(".", 1)[1]
    assert issue.fix == f"move the value to {new}"
    assert issue.message.startswith(f"legacy key: moved to {new} (")
    assert "custom.extra.rollout_matching" in issue.message


def test_relocated_key_that_is_itself_legacy_says_so(tmp_path):
    err = load_errors(_profile_with(tmp_path, "custom.extra.rollout_matching.temperature", 0.5))
    [issue] = err.issues
    assert "rollout_matching.temperature is itself legacy" in issue.message
    assert "rollout_matching.decoding.temperature" in issue.message


def test_other_custom_extra_keys_stay_free_form(tmp_path, minimal):
    from toolkit.config import load_profile

    path = _profile_with(tmp_path, "custom.extra.anything", {"nested": [1, 2]})
    assert load_profile(path).custom.extra.anything.nested == (1, 2)


def test_legacy_key_via_set_has_set_location(minimal):
    err = load_errors(minimal, ["rollout_matching.temperature=0.7"])
    [issue] = err.issues
    assert issue.file == "--set" and issue.line is None
    assert str(issue).startswith("--set: rollout_matching.temperature: legacy key")


def test_legacy_and_schema_errors_reported_together(tmp_path):
    path = _profile_with(tmp_path, "training.packing_length", 10)
    text = path.read_text().replace("learning_rate: 1.0e-05", "learning_rate: '1e-5'")
    path.write_text(text)
    err = load_errors(path)
    assert set(by_path(err)) == {"training.packing_length", "training.learning_rate"}
