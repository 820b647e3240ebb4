"""Vision-language (Qwen-VL family) support: image-only processors, vLLM registration, packed mRoPE."""
