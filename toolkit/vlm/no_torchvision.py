"""Run Qwen-VL image processing where torchvision cannot be installed (CPU machines, docs/VLM.md).

transformers ships a PIL backend for the Qwen2-VL image processor, but two things still reach for
torchvision: vLLM's `qwen2_vl` module imports `smart_resize` from the torchvision-backed module, and
`Qwen2VLProcessor` insists on a video processor (torchvision-only). `install()` aliases that module to
the PIL one; `ImageOnlyQwen2VLProcessor` (processing_image_only.py, shipped inside the model folder as
remote code) drops the video half. Both are no-ops in spirit: same resize rule, same pixel math.
"""

from __future__ import annotations

import importlib.util
import sys
import types

TV_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def install() -> None:
    """Alias the torchvision-backed Qwen2-VL image-processing module to its PIL twin (idempotent)."""
    if torchvision_available() or TV_MODULE in sys.modules:
        return
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    alias = types.ModuleType(TV_MODULE)
    alias.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
    alias.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
    alias.__doc__ = "stage2-toolkit alias of image_processing_pil_qwen2_vl (no torchvision here)"
    sys.modules[TV_MODULE] = alias
