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

from collections.abc import Collection, Sequence

from toolkit.config.settings import RepeatSettings


def should_stop(rule: RepeatSettings, generated: Sequence[int], object_key_ids: Collection[int] = ()) -> bool:
    """True when `generated` (the new tokens so far) trips one of the rule's checks."""
    n = len(generated)
    if n < max(1, rule.min_new_tokens):
        return False
    if rule.max_object_keys and object_key_ids and sum(t in object_key_ids for t in generated) > rule.max_object_keys:
        return True
    r = rule.max_consecutive_token_repeats
    if r > 1 and n >= r and len(set(generated[-r:])) == 1:
        return True
    size, reps = rule.ngram_size, rule.ngram_repeats
    if size > 0 and reps > 1 and n >= size * reps:
        tail = list(generated[-size * reps :])
        gram = tail[:size]
        return all(tail[i * size : (i + 1) * size] == gram for i in range(reps))
    return False


class RepeatWatch:
    """`should_stop` applied token by token, in O(1) per token instead of O(n): `push(token)` returns
    `should_stop(rule, generated so far)`. The backends decode token by token, so they watch with this
    (tests/rollout/test_repeat.py holds the two equal on every prefix)."""

    def __init__(self, rule: RepeatSettings, object_key_ids: Collection[int] = ()):
        self.rule = rule
        self.key_ids = frozenset(object_key_ids)
        self.n = 0  # tokens pushed
        self.keys = 0  # object keys among them
        self.last: int | None = None
        self.run = 0  # length of the run of `last` at the end
        self.tail: list[int] = []  # the last ngram_size × ngram_repeats tokens
        self._tail_len = rule.ngram_size * rule.ngram_repeats if rule.ngram_size > 0 and rule.ngram_repeats > 1 else 0

    def push(self, token: int) -> bool:
        rule = self.rule
        self.run = self.run + 1 if token == self.last else 1
        self.last = token
        self.n += 1
        self.keys += token in self.key_ids
        if self._tail_len:
            self.tail.append(token)
            if len(self.tail) > self._tail_len:
                del self.tail[0]
        if self.n < max(1, rule.min_new_tokens):
            return False
        if rule.max_object_keys and self.key_ids and self.keys > rule.max_object_keys:
            return True
        r = rule.max_consecutive_token_repeats
        if r > 1 and self.run >= r:
            return True
        if self._tail_len and self.n >= self._tail_len:
            size = rule.ngram_size
            return all(self.tail[i : i + size] == self.tail[:size] for i in range(size, self._tail_len, size))
        return False
