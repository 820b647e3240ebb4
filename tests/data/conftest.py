"""Fixtures for the data-layer tests: the committed assets and their tokenizer, val split and Stage-1 helpers.

Tests marked `slow` (pytest.ini deselects them by default) rebuild Stage-1: run them with `-m slow`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"


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
