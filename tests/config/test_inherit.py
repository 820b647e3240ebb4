"""extends and the canonical leaf rules: one hop, pinned knobs, cycles, missing parents, merge."""

from __future__ import annotations

from pathlib import Path

import pytest
from _config_helpers import MINIMAL, by_path, load_errors, write

from toolkit.config import load_profile
from toolkit.config.lint import lint_targets


def leaf_path(project: Path, group: str = "prod", name: str = "ab_mixed") -> Path:
    return project / "configs" / "stage2_ab" / group / f"{name}.yaml"


def edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return path


def test_two_parents_fail(project):
    path = edit(leaf_path(project), "extends: ../base.yaml", "extends: [../base.yaml, ../../base.yaml]")
    err = load_errors(path)
    messages = [i.message for i in by_path(err)["extends"]]
    assert any("exactly one relative path" in m for m in messages)
    assert any("exactly one parent '../base.yaml'" in m for m in messages)


def test_leaf_extending_a_leaf_fails(project):
    path = edit(leaf_path(project, name="a_only"), "extends: ../base.yaml", "extends: ./ab_mixed.yaml")
    err = load_errors(path)
    [issue] = by_path(err)["extends"]
    assert "exactly one parent '../base.yaml', got './ab_mixed.yaml'" in issue.message
    assert issue.line == 3


def test_leaf_extending_the_global_base_directly_fails(project):
    path = edit(leaf_path(project), "extends: ../base.yaml", "extends: ../../base.yaml")
    assert "extends" in by_path(load_errors(path))


def test_cycle_fails(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    [issue] = load_errors(tmp_path / "a.yaml").issues
    assert "cycle in extends: a.yaml → b.yaml → a.yaml" in issue.message
    assert issue.file.endswith("b.yaml") and issue.line == 1


def test_missing_parent_fails_at_the_extends_line(tmp_path):
    path = write(tmp_path / "a.yaml", "# comment\nextends: nowhere.yaml\n")
    err = load_errors(path)
    [issue] = err.issues
    assert "parent file not found" in issue.message and (issue.line, issue.col) == (2, 1)
    assert err.notes and "skipped" in err.notes[0]


def test_missing_pinned_knobs_listed_in_one_error(project):
    path = leaf_path(project, "smoke", "b_only")
    edit(path, "  eval_steps: 20\n", "")
    edit(path, "  n_softctx_iter: 2\n", "")
    edit(path, "  vit_lr: 0.0\n", "")
    [issue] = load_errors(path).issues
    for key in ("training.vit_lr", "training.eval_steps", "stage2_ab.n_softctx_iter"):
        assert key in issue.message
    assert (issue.line, issue.col) == (1, 1)


def test_vllm_leaf_must_pin_vllm_mode(project):
    path = edit(leaf_path(project), "  vllm:\n    mode: server\n", "")
    [issue] = load_errors(path).issues
    assert issue.key_path == "rollout_matching.vllm.mode"


def test_non_canonical_location_is_exempt_from_leaf_rules(tmp_path):
    write(tmp_path / "base.yaml", MINIMAL)
    path = write(tmp_path / "child.yaml", "extends: base.yaml\ntraining:\n  run_name: child\n")
    assert load_profile(path).training.run_name == "child"


def test_repeated_inherited_value_warns(project):
    path = edit(
        leaf_path(project, "smoke", "a_only"),
        "  max_new_tokens: 256\n",
        "  max_new_tokens: 256\n  decode_batch_size: 4\n",
    )
    cfg = load_profile(path)
    [warning] = cfg.warnings
    assert warning.key_path == "rollout_matching.decode_batch_size" and "repeats the inherited value" in warning.message
    report = lint_targets([project / "configs"])
    assert not report.errors and [w.key_path for w in report.warnings] == ["rollout_matching.decode_batch_size"]


def test_pinned_key_equal_to_parent_does_not_warn(project):
    # prod leaves pin learning_rate 2e-5, the same as the stage2 base: pinned keys are exempt
    assert load_profile(leaf_path(project)).warnings == []


def test_deep_merge_maps_merge_lists_replace(tmp_path):
    base = MINIMAL.replace("  effective_batch_size: 8", "  effective_batch_size: 8\n  report_to: [tensorboard, jsonl]")
    write(tmp_path / "base.yaml", base)
    path = write(tmp_path / "child.yaml", "extends: base.yaml\ntraining:\n  report_to: [jsonl]\n  seed: 3\n")
    cfg = load_profile(path)
    assert cfg.training.report_to == ("jsonl",) and cfg.training.seed == 3 and cfg.training.run_name == "t"


def test_error_in_parent_points_at_parent_file(tmp_path):
    write(tmp_path / "base.yaml", MINIMAL.replace("  run_name: t", "  run_nam: t"))
    path = write(tmp_path / "child.yaml", "extends: base.yaml\ntraining:\n  run_name: child\n")
    [issue] = load_errors(path).issues
    assert issue.file.endswith("base.yaml") and issue.key_path == "training.run_nam" and issue.line == 7


def test_stray_profile_under_stage2_ab_is_reported(project):
    write(project / "configs" / "stage2_ab" / "experimental" / "x.yaml", "extends: ../base.yaml\n")
    report = lint_targets([project / "configs"])
    [warning] = report.warnings
    assert warning.file.endswith("experimental/x.yaml") and "not a canonical profile" in warning.message
    assert not report.errors and len(report.profiles) == 8


@pytest.mark.parametrize("group", ["prod", "smoke"])
def test_lint_reports_all_broken_leaves(project, group):
    edit(leaf_path(project, group, "a_only"), "n_softctx_iter: 2", "n_softctx_iters: 2")
    report = lint_targets([project / "configs"])
    assert {i.key_path for i in report.errors} >= {"stage2_ab.n_softctx_iters"}
