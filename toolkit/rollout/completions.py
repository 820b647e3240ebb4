"""vLLM requests and answers as plain data, for both vLLM backends (colocate and server).

Owns: one request's sampling knobs as the dict the engine and the server's /infer/ take (`sampling_dict`),
and a raw vLLM completion → the HF backend's `Rollout` (`finish_rollout`), with the post-hoc
repeat-terminate cut (`repeat_cut`) that gives vLLM rollouts the HF backend's exact semantics.
Imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Sequence

from toolkit.config.settings import DecodeSettings, RepeatSettings
from toolkit.rollout.backends.base import Rollout
from toolkit.rollout.repeat import RepeatWatch


def sampling_dict(s: DecodeSettings, eos_id: int, seed: int | None) -> dict:
    """One request's sampling knobs as plain data (what the server's /infer/ carries)."""
    return {
        "max_tokens": s.max_new_tokens,
        "temperature": s.temperature if s.do_sample else 0.0,
        "top_p": s.top_p if s.do_sample else 1.0,
        "top_k": s.top_k if s.do_sample else -1,
        "repetition_penalty": s.repetition_penalty,
        "stop_token_ids": [eos_id],
        "seed": seed if s.do_sample else None,
    }


def repeat_cut(generated: Sequence[int], rule: RepeatSettings | None, key_ids: frozenset, limit: int) -> int | None:
    """Smallest i in [1, limit] with `should_stop(rule, generated[:i])`, in O(n): the HF backend forces
    <|im_end|> right after such a prefix, so cutting there reproduces its rollout exactly."""
    if rule is None:
        return None
    watch = RepeatWatch(rule, key_ids)
    return next((i for i, token in enumerate(generated[:limit], 1) if watch.push(token)), None)


def finish_rollout(
    prompt: Sequence[int],
    completion: Sequence[int],
    *,
    eos_id: int,
    rule: RepeatSettings | None,
    key_ids: frozenset,
    weight_version: int = 0,
) -> Rollout:
    """A raw vLLM completion → the HF backend's Rollout (ends with <|im_end|> when stopped)."""
    completion = list(completion)
    stop = completion.index(eos_id) if eos_id in completion else None
    limit = stop if stop is not None else len(completion) - 1  # a forced stop needs a position left to emit it
    cut = repeat_cut(completion, rule, key_ids, limit)
    if cut is not None:
        return Rollout(list(prompt), completion[:cut] + [eos_id], "repeat", weight_version)
    if stop is not None:
        return Rollout(list(prompt), completion[: stop + 1], "stop", weight_version)
    return Rollout(list(prompt), completion, "length", weight_version)
