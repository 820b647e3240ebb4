"""Fuzz: mutated valid profiles (insert/delete/rename keys, change types and values at random paths)
either load cleanly or raise ConfigError whose every issue names a key path: never another exception."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from _config_helpers import REPO
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from toolkit.config import ConfigError, ResolvedConfig, load_profile
from toolkit.config.inherit import iter_paths
from toolkit.config.legacy import LEGACY
from toolkit.config.schema import ROOT
from toolkit.config.spec import walk_spec
from toolkit.config.yamlio import dump_yaml

BASE = load_profile("smoke/ab_mixed", world_size=1).to_dict()
KEY_NAMES = sorted(
    {p[-1] for p, _ in walk_spec(ROOT) if p[-1] != "[]"}
    | {k.split(".")[-1] for k in LEGACY if not k.endswith("*")}
    | {"extends", "extra"}
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "1e-5",
            "no",
            "yes",
            "",
            "vllm",
            "server",
            "hf",
            "colocate",
            "auto",
            "zero2",
            "http://h:1",
            "full",
            "lora",
            "steps",
            "sample",
            "cosine",
            "all-linear",
        ]
    ),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=2), st.dictionaries(st.sampled_from(KEY_NAMES), inner, max_size=2)
    ),
    max_leaves=3,
)
new_keys = st.one_of(st.sampled_from(KEY_NAMES), st.text(min_size=1, max_size=10))


def _parent_and_key(data, path):
    node = data
    for part in path[:-1]:
        node = node[part]
    return node, path[-1]


@st.composite
def mutated_profiles(draw):
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p in iter_paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _parent_and_key(data, path)
        op = draw(st.sampled_from(["delete", "rename", "set", "insert"]))
        if op == "delete":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(new_keys)] = parent.pop(key)
        elif op == "insert" and isinstance(parent[key], dict):
            parent[key][draw(new_keys)] = draw(values)
        else:
            parent[key] = draw(values)
    return data


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A scratch dir on tmpfs when there is one: 2,000 write+read cycles cost ~3 ms each on some
    disks and ~0.2 ms in memory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="stage2-config-fuzz-", dir=shm))
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def fuzz_file(scratch):
    return scratch / "profile.yaml"


@settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=mutated_profiles(), world_size=st.sampled_from([1, 2, 3, 4]))
def test_mutated_profiles_load_or_fail_cleanly(fuzz_file, data, world_size):
    fuzz_file.write_text(dump_yaml(data), encoding="utf-8")
    try:
        cfg = load_profile(fuzz_file, world_size=world_size)
    except ConfigError as err:
        event("ConfigError")
        assert err.issues, "a ConfigError must carry issues"
        for issue in err.issues:
            assert isinstance(issue.key_path, str) and issue.key_path.strip(), issue
            assert issue.file and issue.message, issue
        str(err)  # renders
    else:
        event("loaded")
        assert isinstance(cfg, ResolvedConfig)
        assert cfg.training.effective_batch_size % (cfg.training.per_device_train_batch_size * world_size) == 0
        cfg.to_yaml()
        cfg.settings.to_dict()


LEAF_TEXT = (REPO / "configs" / "stage2_ab" / "smoke" / "ab_mixed.yaml").read_text(encoding="utf-8")
NOISE = st.sampled_from(
    [
        ":",
        "- ",
        "  ",
        "{",
        "}",
        "[",
        "]",
        "&a ",
        "*a",
        "!x ",
        "'",
        '"',
        "#",
        "\t",
        "? ",
        "<<: ",
        "1e-5",
        "no",
        "null",
        "extends: ../base.yaml",
        "x: 1",
        "\n",
    ]
)


@st.composite
def mutated_texts(draw):
    lines = LEAF_TEXT.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "insert", "indent"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "indent":
            lines[i] = draw(st.sampled_from(["", " ", "    "])) + lines[i].lstrip()
        else:
            col = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:col] + draw(NOISE) + lines[i][col:]
        if not lines:
            break
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def fuzz_leaf(scratch):
    root = scratch / "proj"
    shutil.copytree(REPO / "configs", root / "configs")
    return root / "configs" / "stage2_ab" / "smoke" / "ab_mixed.yaml"


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=mutated_texts())
def test_mutated_leaf_text_loads_or_fails_cleanly(fuzz_leaf, text):
    """Text-level damage to a canonical leaf (YAML syntax, tags, anchors, duplicates, extends)."""
    fuzz_leaf.write_text(text, encoding="utf-8")
    try:
        load_profile(fuzz_leaf)
        event("loaded")
    except ConfigError as err:
        event("ConfigError")
        assert err.issues and all(i.key_path.strip() and i.file and i.message for i in err.issues)
        str(err)


LEAF_BYTES = LEAF_TEXT.encode("utf-8")


@st.composite
def alias_bombs(draw):
    """Nested anchors, each repeating the previous one `width` times, as a mapping or a list, placed under
    custom.extra or as a new top-level key: levels × width bytes standing for width**levels values."""
    levels, width = draw(st.integers(1, 9)), draw(st.integers(1, 12))
    as_map = draw(st.booleans())
    lines = []
    for i in range(levels):
        item = "x" if i == 0 else f"*b{i - 1}"
        body = (
            ("{" + ", ".join(f"k{j}: {item}" for j in range(width)) + "}")
            if as_map
            else ("[" + ", ".join([item] * width) + "]")
        )
        lines.append(f"b{i}: &b{i} {body}")
    if draw(st.booleans()):
        text = LEAF_TEXT + "custom:\n  extra:\n" + "".join(f"    {line}\n" for line in lines)
    else:
        text = LEAF_TEXT + "".join(f"{line}\n" for line in lines)
    return text, sum(width ** (i + 1) for i in range(levels)) * (2 if as_map else 1)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(bomb=alias_bombs())
def test_alias_bombs_fail_cleanly_naming_the_file(fuzz_leaf, bomb):
    from toolkit.config.yamlio import MAX_NODES

    text, expanded = bomb
    fuzz_leaf.write_text(text, encoding="utf-8")
    try:
        load_profile(fuzz_leaf)
        event("loaded")
        assert expanded <= MAX_NODES
    except ConfigError as err:
        event("ConfigError")
        assert err.issues and all(i.key_path.strip() and i.file and i.message for i in err.issues)
        if expanded > 2 * MAX_NODES:  # well over the budget: refused by it, at a line of this file
            assert any(i.file == str(fuzz_leaf) and i.line and "alias" in i.message for i in err.issues), err
        str(err)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(at=st.integers(0, len(LEAF_BYTES)), junk=st.binary(min_size=1, max_size=6))
def test_non_utf8_bytes_fail_cleanly_at_their_line(fuzz_leaf, at, junk):
    raw = LEAF_BYTES[:at] + junk + LEAF_BYTES[at:]
    fuzz_leaf.write_bytes(raw)
    try:
        raw.decode("utf-8")
        bad = None
    except UnicodeDecodeError as exc:
        bad = exc.start
    try:
        load_profile(fuzz_leaf)
        event("loaded")
        assert bad is None
    except ConfigError as err:
        event("ConfigError")
        assert err.issues and all(i.key_path.strip() and i.file and i.message for i in err.issues)
        if bad is not None:
            [issue] = err.issues
            assert "not UTF-8" in issue.message and issue.file == str(fuzz_leaf)
            assert issue.line == raw[:bad].count(b"\n") + 1
        str(err)
