"""The rollout backend interface shared by hf, vllm colocate and vllm server. Imports nothing heavy.

A backend turns prompt token ids into completions. It never parses or matches: that is the caller's
job, so every backend feeds exactly the same parse → match → targets path. The trainer reads a step's
rollouts as rounds (`generate_chunks`): the vLLM server backend hands over each server round as it
finishes; every other backend inherits `OneRoundChunks`, one round holding the whole step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass
class Rollout:
    """One completion. `completion_ids` excludes the prompt and ends with <|im_end|> when the model stopped."""

    prompt_ids: list[int]  # the engine's prompt (image pads as the engine expanded them)
    completion_ids: list[int]
    finish_reason: str  # "stop" | "length" | "repeat"
    weight_version: int = 0
    # HF backend, image prompts: the prompt's images as the engine patched them ({"pixel_values",
    # "image_grid_thw"}, CPU), handed on so the learner does not open and patch them again. vLLM reads
    # images itself and hands nothing: None.
    pixels: dict | None = None


class RolloutBackend(Protocol):
    name: str

    def generate(
        self, prompts: Sequence[list[int]], *, step: int, images: Sequence[Sequence[str]] | None = None
    ) -> list[Rollout]:
        """Completions for `prompts`, in order, decoded in chunks of decode_batch_size.

        `prompts` are the learner's token ids; for a vision-language model each image's placeholder is
        already expanded (one `<|image_pad|>` per merged vision patch, as the learner trains on them).
        `images` is None (text) or one tuple of absolute image file paths per prompt, in placeholder
        order (() for a prompt without images). Each `Rollout.prompt_ids` is the prompt the engine
        actually decoded from (vLLM expands the pads itself); the caller compares it with its own
        expanded ids and drops a sample that differs.
        """

    def generate_chunks(
        self,
        prompts: Sequence[list[int]],
        *,
        step: int,
        background: bool = True,
        images: Sequence[Sequence[str]] | None = None,
    ) -> RoundStream:
        """The completions of `generate(prompts, ...)` (weights synced for `step` first), handed over in
        rounds of (prompt indices, rollouts) that cover every prompt once, in prompt order. `background`:
        the next round may decode while the caller works on this one (where the backend can)."""

    def sync_weights(self, step: int) -> None:
        """Make the engine decode with the learner's current weights (no-op in-process)."""

    def close(self) -> None:
        """Release engines, sessions and communicators."""


class RoundStream(Protocol):
    """What `generate_chunks` returns: iterate for the rounds; `wait_s` is the time the caller spent blocked
    on them; `close()` stops any round not yet asked for (call it also when leaving early)."""

    wait_s: float

    def __iter__(self) -> Iterator[tuple[list[int], list[Rollout]]]: ...

    def close(self) -> None: ...


class OneRound:
    """A RoundStream of rollouts decoded before it was made: one round with every prompt."""

    def __init__(self, rollouts: list[Rollout], wait_s: float):
        self.rollouts, self.wait_s = rollouts, wait_s

    def __iter__(self) -> Iterator[tuple[list[int], list[Rollout]]]:
        yield list(range(len(self.rollouts))), self.rollouts

    def close(self) -> None:
        return None


class OneRoundChunks:
    """`generate_chunks` for a backend that decodes a whole step in one `generate` call (hf, vLLM colocate):
    sync the weights, decode everything now (the caller waits for all of it), hand it over as one round."""

    def generate_chunks(
        self,
        prompts: Sequence[list[int]],
        *,
        step: int,
        background: bool = True,
        images: Sequence[Sequence[str]] | None = None,
    ) -> OneRound:
        self.sync_weights(step)
        t0 = time.perf_counter()
        rollouts = self.generate(prompts, step=step, images=images)
        return OneRound(rollouts, wait_s=time.perf_counter() - t0)
