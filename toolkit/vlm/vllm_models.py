"""vLLM's Qwen2-VL, Qwen2.5-VL and Qwen3-VL, importable and image-only without torchvision
(registered by vllm_plugin.py).

Only the input side changes: the module alias lets vLLM's modules import, and each processing info
builds the family's image-only processor (no video processor) and offers images only. Qwen3-VL's dummy
inputs builder (used for vLLM's memory profiling) also asks for the video processor, so it is limited
to images here. The model classes, their weight mappings and the multimodal processors are vLLM's own.
"""

from toolkit.vlm.no_torchvision import install

install()

from vllm.model_executor.models import qwen2_5_vl as _q25  # noqa: E402
from vllm.model_executor.models import qwen2_vl as _q  # noqa: E402
from vllm.model_executor.models import qwen3_vl as _q3  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from toolkit.vlm.processing_image_only import ImageOnlyQwen2VLProcessor  # noqa: E402
from toolkit.vlm.processing_image_only_vl import (  # noqa: E402
    ImageOnlyQwen2_5_VLProcessor,
    ImageOnlyQwen3VLProcessor,
)


class ImageOnlyProcessingInfo(_q.Qwen2VLProcessingInfo):
    def get_hf_processor(self, **kwargs):
        return self.ctx.get_hf_processor(ImageOnlyQwen2VLProcessor, **kwargs)

    def get_supported_mm_limits(self):
        return {"image": None}


class ImageOnlyQwen2_5_VLProcessingInfo(_q25.Qwen2_5_VLProcessingInfo):
    def get_hf_processor(self, **kwargs):
        return self.ctx.get_hf_processor(ImageOnlyQwen2_5_VLProcessor, **kwargs)

    def get_supported_mm_limits(self):
        return {"image": None}


class ImageOnlyQwen3VLProcessingInfo(_q3.Qwen3VLProcessingInfo):
    def get_hf_processor(self, **kwargs):
        return self.ctx.get_hf_processor(ImageOnlyQwen3VLProcessor, **kwargs)

    def get_supported_mm_limits(self):
        return {"image": None}

    def get_supported_mm_processor_kwargs(self):
        # Qwen3-VL's own adds video kwargs to a processor that has no video half
        return _q.Qwen2VLProcessingInfo.get_supported_mm_processor_kwargs(self)

    def get_mm_max_tokens_per_item(self, seq_len, mm_counts):
        # the base asks Qwen3-VL's video budget, which needs the video processor
        return {"image": self.get_max_image_tokens()}


class ImageOnlyQwen3VLDummyInputsBuilder(_q3.Qwen3VLDummyInputsBuilder):
    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        width, height = self.info.get_image_size_with_most_features()
        return {
            "image": self._get_dummy_images(
                width=width, height=height, num_images=mm_counts.get("image", 0), overrides=mm_options.get("image")
            )
        }


@MULTIMODAL_REGISTRY.register_processor(
    _q.Qwen2VLMultiModalProcessor, info=ImageOnlyProcessingInfo, dummy_inputs=_q.Qwen2VLDummyInputsBuilder
)
class Qwen2VLForConditionalGeneration(_q.Qwen2VLForConditionalGeneration):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    _q25.Qwen2_5_VLMultiModalProcessor,
    info=ImageOnlyQwen2_5_VLProcessingInfo,
    dummy_inputs=_q25.Qwen2_5_VLDummyInputsBuilder,
)
class Qwen2_5_VLForConditionalGeneration(_q25.Qwen2_5_VLForConditionalGeneration):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    _q3.Qwen3VLMultiModalProcessor, info=ImageOnlyQwen3VLProcessingInfo, dummy_inputs=ImageOnlyQwen3VLDummyInputsBuilder
)
class Qwen3VLForConditionalGeneration(_q3.Qwen3VLForConditionalGeneration):
    pass
