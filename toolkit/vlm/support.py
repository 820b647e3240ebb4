"""Which vision-language architectures the learner and each rollout backend can run here, checked at
`stage2 preflight` / start-up before any rank, engine or server starts (docs/VLM.md, "Support").

Reads only the model folder's config.json and installed-package metadata: no torch, transformers or
vLLM import, so `stage2 preflight` stays fast. A text model (no `vision_config`) and a hub id (no
local folder) pass unchecked.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import entry_points

from toolkit.vlm.inputs import model_config
from toolkit.vlm.vllm_plugin import ARCHS as PLUGIN_ARCHS

# Architectures the learner knows (M-RoPE rows, image pads, packing, tuner groups), by family.
LEARNER_ARCHS = {
    "Qwen2VLForConditionalGeneration": "Qwen2-VL",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL",
    "Qwen3VLForConditionalGeneration": "Qwen3-VL",
}
PLUGIN = "toolkit.vlm.vllm_plugin:register"


class ModelSupportError(ValueError):
    """The model's architecture cannot run with the chosen backend here; the message names the fix."""


def plugin_installed() -> bool:
    return any(e.value == PLUGIN for e in entry_points(group="vllm.general_plugins"))


def check_model_support(model: str, backend: str, where: str = "model.model") -> None:
    """Raise ModelSupportError when the learner or `backend` ("hf" | "vllm") cannot run `model`'s architecture."""
    cfg = model_config(model)
    if "vision_config" not in cfg:
        return
    archs = cfg.get("architectures") or [f"model_type {cfg.get('model_type')!r}"]
    arch = archs[0]
    supported = ", ".join(f"{name} ({arch_})" for arch_, name in LEARNER_ARCHS.items())
    if arch not in LEARNER_ARCHS:
        raise ModelSupportError(
            f"{where} {model}: architecture {arch} is not a vision-language family the learner supports "
            f"(rollout backend {backend}); supported: {supported} (fix: point {where} at a checkpoint of one of "
            f"these families)"
        )
    if backend != "vllm" or importlib.util.find_spec("torchvision") is not None:
        return  # with torchvision, vLLM's own classes serve every family above
    if arch not in PLUGIN_ARCHS or not plugin_installed():
        raise ModelSupportError(
            f"{where} {model}: rollout backend vllm cannot serve architecture {arch} here: torchvision is missing "
            f"and the stage2 vLLM plugin ({PLUGIN}, entry point vllm.general_plugins) is not installed "
            f"(fix: `pip install -e .` in this environment, or use rollout_matching.rollout_backend: hf)"
        )
