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


def tiny_vlm_dir() -> Path:
    """The committed random-init tiny Qwen2-VL folder (model + literal tokenizer + image-only processor),
    made by `assets/build_assets.py`; tests load it read-only."""
    out = ROOT / "assets" / "vlm" / "tiny_qwen2_vl"
    if not (out / "config.json").is_file():
        raise FileNotFoundError(f"{out} is missing: rebuild it with `python assets/build_assets.py --only vlm_model`")
    return out


def shape_images(tmp: Path, sizes=((112, 112), (84, 112), (112, 56))) -> list[str]:
    """Deterministic noise PNGs of the given (width, height) sizes; their paths."""
    import numpy as np
    from PIL import Image

    paths = []
    for i, (w, h) in enumerate(sizes):
        path = Path(tmp) / f"img{i}.png"
        Image.fromarray((np.random.RandomState(i).rand(h, w, 3) * 255).astype("uint8")).save(path)
        paths.append(str(path))
    return paths

