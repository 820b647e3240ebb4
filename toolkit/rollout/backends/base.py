"""The rollout backend interface shared by hf, vllm colocate and vllm server. Imports nothing heavy.

A backend turns prompt token ids into completions. It never parses or matches: that is the caller's
job, so every backend feeds exactly the same parse → match → targets path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence



@dataclass
class Rollout:
    """One completion. `completion_ids` excludes the prompt and ends with <|im_end|> when the model stopped."""

    prompt_ids: list[int]  # the engine's prompt (image pads as the engine expanded them)
    completion_ids: list[int]
    finish_reason: str  # "stop" | "length" | "repeat"
    weight_version: int = 0


class RolloutBackend(Protocol):
    name: str

    def generate(self, prompts: Sequence[list[int]], *, step: int,
                 images: Sequence[Sequence[str]] | None = None) -> list[Rollout]:
        """Completions for `prompts`, in order, decoded in chunks of decode_batch_size.

        `prompts` are the learner's token ids; for a vision-language model each image's placeholder is
        already expanded (one `<|image_pad|>` per merged vision patch, as the learner trains on them).
        `images` is None (text) or one tuple of absolute image file paths per prompt, in placeholder
        order (() for a prompt without images). Each `Rollout.prompt_ids` is the prompt the engine
        actually decoded from (vLLM expands the pads itself); the caller compares it with its own
        expanded ids and drops a sample that differs.
        """

    def sync_weights(self, step: int) -> None:
        """Make the engine decode with the learner's current weights (no-op in-process)."""

    def close(self) -> None:
        """Release engines, sessions and communicators."""
