"""Image-only Qwen2.5-VL and Qwen3-VL processors, shipped as remote code inside a model folder
(`auto_map.AutoProcessor`), as processing_image_only.py is for Qwen2-VL.

Their transformers processors require a video processor, and every transformers video processor needs
torchvision, which CPU machines beside torch+cpu cannot have. Same tokens, same image math, no video.
Self-contained on purpose: transformers copies this file into its module cache and imports it alone.
"""

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin


def _set_tokens(proc, tokenizer) -> None:
    for name in ("image", "video", "vision_start", "vision_end"):
        token = {
            "image": "<|image_pad|>",
            "video": "<|video_pad|>",
            "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>",
        }[name]
        setattr(proc, f"{name}_token", token)
        setattr(proc, f"{name}_token_id", tokenizer.convert_tokens_to_ids(token))


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        _set_tokens(self, tokenizer)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        _set_tokens(self, tokenizer)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
