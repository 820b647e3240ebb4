"""vLLM general plugin (setup.py entry point `vllm.general_plugins`): loaded by vLLM in every process.

Without torchvision, vLLM's Qwen-VL models fail at import and want a video processor. Re-register them under a
module of ours that installs the PIL alias first (toolkit/vlm/no_torchvision.py) and subclasses vLLM's
class with an image-only processor: the model code that runs is vLLM's. With torchvision present: nothing.
"""

from __future__ import annotations

# The architectures re-registered here: what `stage2 preflight` accepts for the vLLM backends without torchvision.
ARCHS = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration")


def register() -> None:
    from toolkit.vlm.no_torchvision import torchvision_available

    if torchvision_available():
        return
    from vllm import ModelRegistry

    for arch in ARCHS:
        ModelRegistry.register_model(arch, f"toolkit.vlm.vllm_models:{arch}")
