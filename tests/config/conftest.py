"""Fixtures for config tests: a temp project with a copy of configs/, and a minimal flat profile."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _config_helpers import MINIMAL, REPO, write


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A temp project root holding a copy of the repo's configs/ (canonical layout)."""
    root = tmp_path / "proj"
    shutil.copytree(REPO / "configs", root / "configs")
    return root


@pytest.fixture
def minimal(tmp_path: Path) -> Path:
    return write(tmp_path / "p.yaml", MINIMAL)
