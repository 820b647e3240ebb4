"""Image-only Qwen2-VL processor, shipped as remote code inside a model folder (`auto_map.AutoProcessor`).

`Qwen2VLProcessor` requires a video processor, and every transformers video processor needs torchvision,
which CPU machines beside torch+cpu cannot have. Same tokens, same image math, no video.
Self-contained on purpose: transformers copies this file into its module cache and imports it alone.
"""

from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
