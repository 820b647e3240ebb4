"""Full-precision views of a (possibly ZeRO-3 partitioned, possibly LoRA-wrapped) model: gathered named
tensors with LoRA merged, the HF `save_pretrained` export built on them, and LoRA wrapping.

Owns: everything that turns the live training module into plain HF-named tensors. `Stage2Engine`
delegates `named_full_params` / `full_state_dict` / `export_hf` here. Must not import the config spine;
`deepspeed`, `peft` and `torch.distributed` are imported inside functions, so importing this module
stays cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)


# LoRA wraps the language model only; these (vision tower, projector) keep full weights (regex, full match).
VISION_MODULES = r".*\b(visual|vision_tower|vision_model|multi_modal_projector)\b.*"


def apply_lora(
    model, rank: int, alpha: float, dropout: float, target_modules: str | Sequence[str], use_dora: bool = False
):
    """Wrap `model` with peft LoRA (or DoRA: `use_dora`) adapters; "all-linear" targets every linear layer
    but the output head.

    On a vision-language model the adapters go on the language model only, and the vision tower and
    aligner stay trainable in full: their own learning rates (`vit_lr`, `aligner_lr`; 0 freezes) decide.
    """
    import peft

    from toolkit.trainer.optim import param_role

    if isinstance(target_modules, str):
        targets = target_modules if target_modules == "all-linear" else [target_modules]
    else:
        targets = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    vlm = any(param_role(n) != "llm" for n, _ in model.named_parameters())
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        exclude_modules=VISION_MODULES if vlm else None,
        use_dora=use_dora,
    )
    wrapped = peft.get_peft_model(model, config)
    for name, param in wrapped.named_parameters():
        if vlm and param_role(name) != "llm":
            param.requires_grad_(True)  # peft froze the base model; build_optimizer applies vit/aligner lr
    n_train = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    log.info(
        "%s r=%d alpha=%g dropout=%g targets=%s: %d trainable params",
        "DoRA" if use_dora else "LoRA",
        rank,
        alpha,
        dropout,
        targets,
        n_train,
    )
    return wrapped


def is_peft(module) -> bool:
    """Is `module` a peft wrapper (the HF model sits under `get_base_model()`)?"""
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def hf_root(module):
    """The plain HF model: the base model of a peft wrapper, else `module` itself."""
    return module.get_base_model() if is_peft(module) else module


@torch.no_grad()  # as a decorator it wraps each resume of the generator, not the consumer's code
def named_full_params(module, zero3: bool, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor copied to `device`) for every parameter and persistent buffer, LoRA merged.

    Collective when `zero3` (one gather per module): every rank must exhaust the iterator. The merge
    is computed as W + ΔW without touching the live weights (a peft merge+unmerge round trip is not
    bit-exact in floating point).
    """
    import deepspeed

    root = hf_root(module)
    if is_peft(module):
        from peft.tuners.lora import LoraLayer as lora_cls
    else:
        lora_cls = None
    skip: tuple[str, ...] = ()
    for prefix, mod in root.named_modules():
        if skip and prefix.startswith(skip):
            continue
        if type(mod).__name__ == "ModulesToSaveWrapper":
            raise NotImplementedError("named_full_params: peft modules_to_save is not supported")
        is_lora = lora_cls is not None and isinstance(mod, lora_cls)
        params = list(mod.parameters(recurse=is_lora))
        with deepspeed.zero.GatheredParameters(params, enabled=zero3 and bool(params)):
            if is_lora:
                skip += (prefix + ".",)
                yield from _merged_lora_tensors(prefix, mod, device)
                continue
            for name, tensor in _own_tensors(mod):
                yield (f"{prefix}.{name}" if prefix else name), tensor.detach().to(device, copy=True)


SUPPORT_FILES = ("*.py", "processor_config.json", "preprocessor_config.json", "chat_template.jinja")


def copy_support_files(source: str | Path, directory: str | Path) -> None:
    """Give an export what `save_pretrained` does not write: the source folder's remote code (the literal
    tokenizer class, the image-only processor) and processor configs, so it loads like the original."""
    import shutil

    if not Path(source).is_dir():
        return  # a hub id: nothing local to carry over
    for pattern in SUPPORT_FILES:
        for src in Path(source).glob(pattern):
            if not (Path(directory) / src.name).exists():
                shutil.copy(src, Path(directory) / src.name)


def export_hf(module, zero3: bool, rank: int, directory: str, tokenizer=None) -> None:
    """HF `save_pretrained` (safetensors, LoRA merged) on rank 0; all ranks call it (barrier at the end)."""
    import torch.distributed as dist

    # Collective under ZeRO-3 (a plain save_pretrained there writes empty tensors); only rank 0 keeps
    # the CPU copy, so a node does not hold world_size full models in host memory.
    state = {name: t for name, t in named_full_params(module, zero3) if rank == 0}
    if rank == 0:
        hf_root(module).save_pretrained(str(directory), state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        log.info("exported HF model (%d tensors) to %s", len(state), directory)
    dist.barrier()


def _merge_adapter(mod, adapter: str, weight: torch.Tensor) -> torch.Tensor:
    """W + ΔW for LoRA; for DoRA m · (W + ΔW) / ‖W + ΔW‖ (row norms of the unmerged weight, as peft's
    own merge and forward compute them)."""
    delta = mod.get_delta_weight(adapter).to(weight.dtype)
    if not mod.use_dora.get(adapter, False):
        return weight + delta
    from peft.utils.other import transpose

    magnitude = mod.lora_magnitude_vector[adapter]
    fan_in_fan_out = getattr(mod, "fan_in_fan_out", False)
    norm = magnitude.get_weight_norm(weight, transpose(delta, fan_in_fan_out), scaling=1).detach()
    factor = transpose((magnitude.weight / norm).view(-1, 1), fan_in_fan_out)
    return (factor * (weight + delta)).to(weight.dtype)


def _own_tensors(mod) -> Iterator[tuple[str, torch.Tensor]]:
    yield from mod.named_parameters(recurse=False)
    for name, buf in mod.named_buffers(recurse=False):
        if name not in mod._non_persistent_buffers_set:
            yield name, buf


def _merged_lora_tensors(prefix: str, mod, device) -> Iterator[tuple[str, torch.Tensor]]:
    base = mod.get_base_layer()
    weight = base.weight.detach().clone()
    if not mod.disable_adapters and not mod.merged:  # a merged layer already holds the merged weight
        for adapter in mod.active_adapters:
            if adapter in mod.lora_A:
                weight = _merge_adapter(mod, adapter, weight)
    yield f"{prefix}.weight", weight.to(device)
    for name, tensor in _own_tensors(base):
        if name != "weight":
            yield f"{prefix}.{name}", tensor.detach().to(device, copy=True)
