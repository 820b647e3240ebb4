"""Hostile profiles and --set values (issue 15): alias bombs, deep nesting, non-UTF-8 bytes, a broken IPv6
URL, the file a missing key is blamed on, and relative paths of a parent written in another project."""

from __future__ import annotations

from pathlib import Path

import pytest
from _config_helpers import MINIMAL, REPO, by_path, load_errors, write
from click.testing import CliRunner

from launchers.cli import main
from toolkit.config import load_profile
from toolkit.config.yamlio import MAX_NESTING, MAX_NODES


def run(args):
    # catch_exceptions=False: a bare traceback fails the test instead of turning into exit code 1.
    return CliRunner().invoke(main, args, catch_exceptions=False)


def alias_bomb(levels: int = 7, width: int = 9) -> str:
    """Each anchor repeats the one before `width` times: width**levels values in a few hundred bytes."""
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "custom:\n  extra:\n" + "".join(f"    {line}\n" for line in lines)


def test_alias_bomb_profile_is_refused_naming_file_and_line(tmp_path):
    text = MINIMAL + alias_bomb()
    assert len(text.encode()) < 1200  # 9**7 ≈ 4.8 million values once expanded
    path = write(tmp_path / "bomb.yaml", text)
    err = load_errors(path)
    [issue] = err.issues
    assert issue.file == str(path) and issue.line is not None
    assert f"more than {MAX_NODES:,} values" in issue.message and "alias" in issue.message


def test_alias_bomb_in_stage2_config_is_one_clear_error(tmp_path):
    path = write(tmp_path / "bomb.yaml", MINIMAL + alias_bomb())
    result = run(["config", "-p", str(path)])
    assert result.exit_code == 1 and result.stdout == ""
    assert f"{path}:" in result.stderr and "alias" in result.stderr


def test_shared_anchor_within_budget_still_loads(tmp_path):
    """Aliases are fine; only the expanded size is limited (a list reused three times)."""
    path = write(tmp_path / "p.yaml", MINIMAL + "custom:\n  extra:\n    a: &l [1, 2, 3]\n    b: *l\n    c: *l\n")
    assert list(load_profile(path).custom.extra["c"]) == [1, 2, 3]


@pytest.mark.parametrize(
    "value,text",
    [
        ("&a [*a]", "alias refers to itself"),
        ("&a {x: *a}", "alias refers to itself"),
        (
            "[&b [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b], "
            "&d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c], &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]]",
            f"more than {MAX_NODES:,} values",
        ),
        ("!!python/object/apply:os.system [echo hi]", "is not supported"),
        ("{<<: {a: 1}}", "merge keys"),
    ],
)
def test_set_value_with_hostile_yaml_is_a_set_error(value, text):
    err = load_errors("smoke/ab_mixed", [f"custom.extra.x={value}"])
    [issue] = by_path(err)["custom.extra.x"]
    assert issue.file == "--set" and text in issue.message
    assert "quote it" in issue.fix


def test_deep_nesting_is_refused(tmp_path):
    depth = MAX_NESTING + 10
    path = write(tmp_path / "deep.yaml", MINIMAL + "custom:\n  extra:\n    x: " + "[" * depth + "]" * depth + "\n")
    [issue] = load_errors(path).issues
    assert issue.file == str(path) and f"deeper than {MAX_NESTING} levels" in issue.message
    err = load_errors("smoke/ab_mixed", ["custom.extra.x=" + "[" * 500 + "]" * 500])
    assert f"deeper than {MAX_NESTING} levels" in by_path(err)["custom.extra.x"][0].message


def _latin1_profile(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(MINIMAL.replace("run_name: t", "run_name: caf\xe9").encode("latin-1"))
    return path


def test_non_utf8_profile_names_file_line_and_column(tmp_path):
    path = _latin1_profile(tmp_path / "latin.yaml")
    [issue] = load_errors(path).issues
    line = MINIMAL.splitlines().index("  run_name: t") + 1
    assert (issue.file, issue.line, issue.col) == (str(path), line, len("  run_name: caf") + 1)
    assert "not UTF-8" in issue.message and "0xe9" in issue.message


def test_non_utf8_profile_in_config_and_preflight(tmp_path):
    path = _latin1_profile(tmp_path / "latin.yaml")
    for args in (["config", "-p", str(path)], ["preflight", "-p", str(path)]):
        result = run(args)
        assert result.exit_code == 1 and f"{path}:" in result.stderr and "not UTF-8" in result.stderr, args


def test_one_non_utf8_profile_does_not_stop_lint(project):
    smoke = project / "configs" / "stage2_ab" / "smoke"
    bad = smoke / "a_only.yaml"
    bad.write_bytes(bad.read_bytes() + "# caf\xe9\n".encode("latin-1"))
    broken = smoke / "b_only.yaml"
    broken.write_text(broken.read_text().replace("n_softctx_iter: 2", "n_softctx_iterz: 2"))
    result = run(["lint-profiles", str(project / "configs")])
    assert result.exit_code == 1
    assert f"{bad}:" in result.stdout and "not UTF-8" in result.stdout
    assert f"{broken}:" in result.stdout and "n_softctx_iterz" in result.stdout  # the other leaves were linted
    leaves = len(list((project / "configs" / "stage2_ab").glob("*/*.yaml")))
    assert f"linted {leaves} profiles" in result.stderr


@pytest.mark.parametrize("url", ["http://[::1", "http://[::1]:99999", "http://[zz]:80"])
def test_broken_base_url_is_a_field_error(url):
    err = load_errors("prod/ab_mixed", [f"rollout_matching.vllm.server.servers[0].base_url={url}"])
    [issue] = by_path(err)["rollout_matching.vllm.server.servers[0].base_url"]
    assert "is not an http(s) URL with host and port" in issue.message
    assert (
        run(
            ["config", "-p", "prod/ab_mixed", "--set", f"rollout_matching.vllm.server.servers[0].base_url={url}"]
        ).exit_code
        == 1
    )


def test_missing_keys_of_an_extends_only_leaf_are_blamed_on_the_leaf(project):
    leaf = write(
        project / "configs" / "stage2_ab" / "smoke" / "empty.yaml", "# nothing of its own\nextends: ../base.yaml\n"
    )
    err = load_errors(leaf)
    missing = [i for i in err.issues if i.message == "required key is missing"]
    assert {i.key_path for i in missing} >= {"model.model", "training.run_name", "data.train_jsonl"}
    assert all((i.file, i.line) == (str(leaf), 2) for i in missing), missing  # the extends line


def test_missing_key_in_a_section_the_leaf_writes_points_at_that_section(project):
    leaf = write(
        project / "configs" / "stage2_ab" / "smoke" / "part.yaml",
        "extends: ../base.yaml\ntraining:\n  learning_rate: 1.0e-4\n",
    )
    missing = {i.key_path: i for i in load_errors(leaf).issues if i.message == "required key is missing"}
    assert (missing["training.run_name"].file, missing["training.run_name"].line) == (str(leaf), 2)
    assert missing["model.model"].line == 1


def test_parent_paths_resolve_against_the_parent_project(tmp_path):
    """A profile outside the repo extending a canonical leaf: the leaf's `assets/...` stay in the repo,
    the outside file's own relative paths resolve against its own folder."""
    canonical = REPO / "configs" / "stage2_ab" / "smoke" / "ab_mixed.yaml"
    mine = write(tmp_path / "elsewhere" / "mine.yaml", f"extends: {canonical}\ntraining:\n  output_dir: runs/x\n")
    cfg = load_profile(mine, cwd=tmp_path)
    assert cfg.model.model == str(REPO / "assets" / "stage1")  # a path that exists, not a hub id
    assert cfg.data.train_jsonl == str(REPO / "assets" / "data" / "train.jsonl")
    assert cfg.training.logging_dir == str(tmp_path / "elsewhere" / "runs" / "x" / "tb")  # follows output_dir
    assert cfg.training.output_dir == str(tmp_path / "elsewhere" / "runs" / "x")
