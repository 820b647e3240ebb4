"""In-process HF `generate` rollouts on the learner's own module (the CPU demo's backend).

Heavy imports (torch, transformers) happen at call time. Under ZeRO-3 the caller's
`generation_context` gathers the parameters (a collective on entry and exit), so every rank must make
the same number of `generate` calls: callers give every rank the same number of prompts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

from toolkit.config.settings import DecodeSettings
from toolkit.rollout.backends.base import OneRoundChunks, Rollout
from toolkit.rollout.chunking import chunked, seed_base
from toolkit.rollout.repeat import RepeatWatch


class HFBackend(OneRoundChunks):
    """Greedy or sampled decoding with `module.generate`, left-padded chunks of decode_batch_size."""

    name = "hf"

    def __init__(
        self,
        module,
        settings: DecodeSettings,
        *,
        pad_id: int,
        eos_id: int,
        object_key_ids: Sequence[int] = (),
        device=None,
        generation_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
        vision=None,
    ):
        self.module = module
        self.s = settings
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.object_key_ids = list(object_key_ids)
        self.device = device
        self.generation_context = generation_context
        self.vision = vision  # toolkit.vlm.inputs.VisionProcessor for a Qwen-VL model, else None

    def generate(
        self, prompts: Sequence[list[int]], *, step: int, images: Sequence[Sequence[str]] | None = None
    ) -> list[Rollout]:
        """`prompts`: the learner's (expanded) prompt ids; `images`: per prompt, its image paths (VLM)."""
        out: list[Rollout] = []
        for offset, chunk in chunked(list(prompts), self.s.decode_batch_size):
            rows = [tuple(row) for row in images[offset : offset + len(chunk)]] if images else [()] * len(chunk)
            out.extend(self._generate_chunk(chunk, seed=seed_base(self.s.seed, step) + offset, rows=rows))
        return out

    def sync_weights(self, step: int) -> None:  # the module *is* the learner: nothing to copy
        return None

    def close(self) -> None:
        return None

    def _generate_chunk(
        self, prompts: Sequence[list[int]], seed: int, rows: Sequence[tuple[str, ...]]
    ) -> list[Rollout]:
        """One left-padded `generate`; `rows`: each prompt's image paths. Each rollout carries its prompt's
        pixel inputs (`Rollout.pixels`): the images are opened and patched here once for the whole step."""
        import torch

        from toolkit.vlm.inputs import split_pixels

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at the same column
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        if self.device is not None:
            ids, mask = ids.to(self.device), mask.to(self.device)
        was_training = self.module.training
        self.module.eval()
        try:
            kwargs = self._generate_kwargs(prompt_width=width)
            pixels = self.vision.model_inputs([p for row in rows for p in row]) if any(rows) else {}
            if pixels:
                # mm_token_type_ids is what makes HF compute M-RoPE positions; without it generate
                # silently falls back to 1-D positions.
                kwargs.update(
                    {k: v.to(ids.device) for k, v in pixels.items()},
                    mm_token_type_ids=(ids == self.vision.pad_id).int(),
                )
            # inference_mode entered last (ZeRO-3 gathers and frees the parameters outside it): no autograd
            # bookkeeping per op, 5-12 % of a decode in a plain loop on the tiny model (docs/PERFORMANCE.md)
            with (
                torch.no_grad(),
                self.generation_context(),
                _forked_rng(seed, self.s.do_sample),
                torch.inference_mode(),
            ):
                seqs = self.module.generate(input_ids=ids, attention_mask=mask, **kwargs)
        finally:
            self.module.train(was_training)
        cut = next((p.cut for p in kwargs["logits_processor"] if isinstance(p, RepeatTerminateProcessor)), set())
        row_pixels = split_pixels(pixels, [len(row) for row in rows])
        return [self._to_rollout(p, seqs[i, width:].tolist(), i in cut, row_pixels[i]) for i, p in enumerate(prompts)]

    def _generate_kwargs(self, prompt_width: int) -> dict:
        from transformers import GenerationConfig, LogitsProcessorList

        s = self.s
        gen = GenerationConfig(
            max_new_tokens=s.max_new_tokens,
            do_sample=s.do_sample,
            temperature=s.temperature if s.do_sample else None,
            top_p=s.top_p if s.do_sample else None,
            # 0, not None, when disabled: None would take the checkpoint's generation_config.json or transformers'
            # default top-k of 50, and the HF backend would sample from another distribution than vLLM's top_k -1.
            top_k=max(s.top_k, 0) if s.do_sample else None,
            repetition_penalty=s.repetition_penalty,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )
        procs = LogitsProcessorList()
        if s.repeat is not None:
            procs.append(RepeatTerminateProcessor(s.repeat, self.object_key_ids, self.eos_id, prompt_width))
        return {"generation_config": gen, "logits_processor": procs}

    def _to_rollout(
        self, prompt: list[int], completion: list[int], repeat_cut: bool = False, pixels: dict | None = None
    ) -> Rollout:
        if self.eos_id in completion:
            completion = completion[: completion.index(self.eos_id) + 1]
            return Rollout(list(prompt), completion, "repeat" if repeat_cut else "stop", pixels=pixels)
        while completion and completion[-1] == self.pad_id:
            completion.pop()
        return Rollout(list(prompt), completion, "length", pixels=pixels)


class RepeatTerminateProcessor:
    """Force <|im_end|> on rows whose generated tokens trip the repeat-terminate rule (repeat.py).

    Watches each row's new tokens once (`RepeatWatch`, O(1) per token), and records which rows it cut, so
    their rollouts report finish_reason "repeat".
    """

    def __init__(self, rule, key_ids: Sequence[int], eos_id: int, prompt_width: int):
        self.rule = rule
        self.key_ids = frozenset(key_ids)
        self.eos_id = eos_id
        self.prompt_width = prompt_width
        self.watches: list[RepeatWatch] = []
        self.seen = 0  # generated tokens already pushed to the watches
        self.done: set[int] = set()  # rows that emitted <|im_end|>: they only grow padding, never a repeat
        self.cut: set[int] = set()

    def __call__(self, input_ids, scores):
        if not self.watches:
            self.watches = [RepeatWatch(self.rule, self.key_ids) for _ in range(input_ids.shape[0])]
        new = input_ids[:, self.prompt_width + self.seen :]
        self.seen += new.shape[1]
        for row, tokens in enumerate(new.tolist()):
            for token in tokens:
                if row in self.done or row in self.cut:
                    break
                if token == self.eos_id:
                    self.done.add(row)
                elif self.watches[row].push(token):
                    self.cut.add(row)
        for row in self.cut:
            scores[row] = float("-inf")
            scores[row, self.eos_id] = 0.0
        return scores


@contextlib.contextmanager
def _forked_rng(seed: int, active: bool):
    """Seed torch's RNG for sampling and restore it after, so rollouts never shift training randomness."""
    import torch

    if not active:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
