"""vLLM's Qwen2-VL, importable and image-only without torchvision (registered by vllm_plugin.py).

Only two things change, both on the input side: the module alias lets vLLM's `qwen2_vl` import, and
the processing info builds `ImageOnlyQwen2VLProcessor` (no video processor) and offers images only.
The model class, its weights mapping and the multimodal processor are vLLM's own.
"""
from toolkit.vlm.no_torchvision import install

install()

from vllm.model_executor.models import qwen2_vl as _q  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from toolkit.vlm.processing_image_only import ImageOnlyQwen2VLProcessor  # noqa: E402


class ImageOnlyProcessingInfo(_q.Qwen2VLProcessingInfo):
    def get_hf_processor(self, **kwargs):
        return self.ctx.get_hf_processor(ImageOnlyQwen2VLProcessor, **kwargs)

    def get_supported_mm_limits(self):
        return {"image": None}


@MULTIMODAL_REGISTRY.register_processor(_q.Qwen2VLMultiModalProcessor, info=ImageOnlyProcessingInfo,
                                        dummy_inputs=_q.Qwen2VLDummyInputsBuilder)
class Qwen2VLForConditionalGeneration(_q.Qwen2VLForConditionalGeneration):
    pass
