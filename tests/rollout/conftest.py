"""Shared fixtures for the rollout-core tests: one ToyCodec and small rendering helpers."""

import pytest

from toolkit.rollout.codec import ToyCodec


@pytest.fixture(scope="session")
def codec():
    return ToyCodec()
