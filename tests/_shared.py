"""Helpers shared by several test folders (importable because tests/conftest.py puts tests/ on sys.path)."""
from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_model_dir(tmp: Path) -> Path:
    """The committed random-init tiny Qwen2 + tokenizer as one from_pretrained / vLLM directory
    (untied, head_dim 32) — tests that must not depend on the Stage-1 checkpoint use it."""
    out = Path(tmp) / "tiny_model"
    if not out.exists():
        out.mkdir(parents=True)
        for part in ("tiny_qwen2", "tokenizer"):
            for f in (ROOT / "assets" / part).iterdir():
                shutil.copy(f, out / f.name)
    return out
