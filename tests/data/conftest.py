"""Fixtures for the data-layer tests: the committed assets, the repo root, and the `slow` marker.

Tests marked `slow` (a full Stage-1 rebuild, ~25-40 min on one CPU thread) run only when selected
with `-m slow`; a plain `pytest tests/data` skips them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long rebuilds; run with -m slow")


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: select with -m slow")
    for item in items:
        if "slow" in item.keywords and str(item.fspath).startswith(str(Path(__file__).parent)):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def tok():
    from toolkit.data.tokenizer import load_tokenizer

    return load_tokenizer(ASSETS / "tokenizer")


@pytest.fixture(scope="session")
def val_records():
    from toolkit.data.records import load_records

    return load_records(ASSETS / "data" / "val.jsonl")


@pytest.fixture(scope="session")
def stage1_module():
    """assets/stage1.py (evaluation helpers), imported from beside the build script."""
    sys.path.insert(0, str(ASSETS))
    import stage1

    return stage1
