"""stage2-toolkit library. Heavy engines (torch, deepspeed, vllm) are imported lazily in trainer/ and rollout/."""

__version__ = "0.1.0"
