"""Repeat-terminate: when a rollout must be cut short (object spam, token loops). Imports nothing heavy.

One pure rule shared by every backend, so HF, colocated vLLM and the rollout server stop the same
sequences (the predecessor's vLLM path silently skipped it). Once at least
`min_new_tokens` were generated, a sequence stops when any of these holds:
- it opened more than `max_object_keys` objects (so at most that many complete objects survive);
- its last `max_consecutive_token_repeats` tokens are one token repeated;
- its last `ngram_size × ngram_repeats` tokens are one n-gram repeated `ngram_repeats` times.
A zero (or null) knob disables its check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence


@dataclass(frozen=True)
class RepeatRule:
    min_new_tokens: int = 0
    max_consecutive_token_repeats: int = 0
    ngram_size: int = 0
    ngram_repeats: int = 0
    max_object_keys: int | None = None

    @classmethod
    def from_cfg(cls, rt: dict) -> "RepeatRule | None":
        """The rule of `rollout_matching_cfg["repeat_terminate"]`, or None when it is disabled."""
        if not rt["enabled"]:
            return None
        keys = ("min_new_tokens", "max_consecutive_token_repeats", "ngram_size", "ngram_repeats", "max_object_keys")
        return cls(**{k: rt[k] for k in keys if k in rt})

    def should_stop(self, generated: Sequence[int], object_key_ids: Collection[int] = ()) -> bool:
        n = len(generated)
        if n < max(1, self.min_new_tokens):
            return False
        if self.max_object_keys and object_key_ids:
            if sum(t in object_key_ids for t in generated) > self.max_object_keys:
                return True
        r = self.max_consecutive_token_repeats
        if r > 1 and n >= r and len(set(generated[-r:])) == 1:
            return True
        size, reps = self.ngram_size, self.ngram_repeats
        if size > 0 and reps > 1 and n >= size * reps:
            tail = list(generated[-size * reps :])
            gram = tail[:size]
            return all(tail[i * size : (i + 1) * size] == gram for i in range(reps))
        return False
