"""Loads tokenizer.json unchanged (see assets/build_assets.py, pin_tokenizer_class)."""
from transformers import TokenizersBackend


class LiteralBPETokenizer(TokenizersBackend):
    """A literal-text BPE; exists only so AutoTokenizer does not swap in the byte-level Qwen2Tokenizer."""
