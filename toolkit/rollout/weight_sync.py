"""Weight sync shared by the learner and the rollout server: tensor specs, the name check, buckets.

Owns: which names a served checkpoint holds (read from safetensors headers, no tensor loaded), the
learner-vs-server name/shape check, and byte-exact bucket packing. The process group the buckets travel
through is `sync_group.py`.
torch is imported inside functions only, so the app and the client import this module cheaply.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from toolkit.rollout.errors import BadRequest

log = logging.getLogger(__name__)

# safetensors dtype tags → torch dtype names
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
# Checkpoint entries vLLM never loads, so a learner need not send them.
IGNORED_CHECKPOINT_SUFFIXES = ("rotary_emb.inv_freq",)
# Learner tensors vLLM skips when the checkpoint ties them to another (tie_word_embeddings).
TIED_ALIASES = ("lm_head.weight",)
# Wrapper prefixes/infixes a trainer name may carry (DDP/DeepSpeed `module.`, torch.compile, peft).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
WRAPPER_INFIXES = (".base_layer.", ".modules_to_save.default.", "._orig_mod.")
MAX_LISTED = 12
# The learner's weights as both vLLM backends take them: device → (HF name, full tensor); collective on ZeRO-3.
WeightsFn = Callable[[str], Iterator[tuple[str, object]]]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * dtype_size(self.dtype)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def dtype_size(dtype: str) -> int:
    sizes = {
        "float64": 8,
        "int64": 8,
        "float32": 4,
        "int32": 4,
        "float16": 2,
        "bfloat16": 2,
        "int16": 2,
        "int8": 1,
        "uint8": 1,
        "bool": 1,
    }
    if dtype not in sizes:
        raise BadRequest(f"unsupported tensor dtype {dtype!r} (supported: {', '.join(sizes)})")
    return sizes[dtype]


def checkpoint_name(name: str) -> str:
    """A trainer parameter name as the HF checkpoint (and vLLM's `load_weights`) spells it.

    >>> checkpoint_name("module.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
    """
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p) :], True
    for infix in WRAPPER_INFIXES:
        name = name.replace(infix, ".")
    return name


def read_checkpoint_specs(model_dir: str | Path) -> dict[str, TensorSpec] | None:
    """name → TensorSpec for every tensor in the directory's *.safetensors files (headers only).

    Returns None when `model_dir` is not a local directory with safetensors files (a hub id, .bin files).
    """
    root = Path(model_dir)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    if not files:
        return None
    specs: dict[str, TensorSpec] = {}
    for path in files:
        try:
            with open(path, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
        except (struct.error, ValueError, MemoryError, OverflowError) as exc:  # cut or damaged file
            raise ValueError(
                f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}) "
                "(fix: re-export the model folder with save_pretrained, or point model.model "
                "at an intact copy)"
            ) from None
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower())
            specs[name] = TensorSpec(name, dtype, tuple(entry["shape"]))
    return specs


def specs_of(named_tensors: Iterable[tuple[str, object]]) -> dict[str, TensorSpec]:
    """name → TensorSpec of (name, tensor) pairs, names mapped to checkpoint names (meta tensors work)."""
    out = {}
    for name, t in named_tensors:
        key = checkpoint_name(name)
        out[key] = TensorSpec(key, str(t.dtype).removeprefix("torch."), tuple(t.shape))
    return out


def spec_problems(learner: dict[str, TensorSpec], served: dict[str, TensorSpec]) -> list[str]:
    """Every name or shape mismatch between what the learner sends and what the engine loads."""
    missing = [n for n in served if n not in learner and not n.endswith(IGNORED_CHECKPOINT_SUFFIXES)]
    extra = [n for n in learner if n not in served and n not in TIED_ALIASES]
    shapes = [
        f"{n}: learner {list(learner[n].shape)} vs served {list(served[n].shape)}"
        for n in learner
        if n in served and learner[n].shape != served[n].shape
    ]
    out = []
    for label, items in (
        ("not sent by the learner", missing),
        ("unknown to the served checkpoint", extra),
        ("shape mismatch", shapes),
    ):
        if items:
            shown = ", ".join(sorted(items)[:MAX_LISTED]) + (
                f", … ({len(items)} in all)" if len(items) > MAX_LISTED else ""
            )
            out.append(f"{len(items)} {label}: {shown}")
    return out


def check_specs(learner: dict[str, TensorSpec], served: dict[str, TensorSpec] | None, where: str) -> None:
    """Raise ValueError listing every mismatch; a None `served` (not a local checkpoint) is not checked."""
    if served is None:
        log.warning(
            "%s: the served model is not a local safetensors directory; weight names are not pre-checked", where
        )
        return
    problems = spec_problems(learner, served)
    if problems:
        raise ValueError(
            f"weight sync to {where}: the learner's tensors do not match the served checkpoint:\n  - "
            + "\n  - ".join(problems)
            + "\n(fix: serve the same architecture as model.model; LoRA must be merged (sync.mode full) and "
            "wrapper prefixes stripped — see toolkit.rollout.weight_sync.checkpoint_name)"
        )


def sendable(name: str, served: dict[str, TensorSpec] | None) -> bool:
    """Should the learner send this (checkpoint-named) tensor? Tied aliases the checkpoint lacks are skipped."""
    return served is None or name in served or name not in TIED_ALIASES


# ------------------------------------------------------------------ buckets


def iter_buckets(named: Iterable[tuple[str, object]], bucket_bytes: int) -> Iterator[list[tuple[str, object]]]:
    """Group (name, tensor) pairs, in order, into buckets of about `bucket_bytes` (a bigger tensor goes alone)."""
    bucket: list = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


ALIGN = 8  # every tensor starts at a multiple of 8 bytes, so dtype views of the flat buffer are legal


def bucket_layout(specs: Sequence[TensorSpec]) -> tuple[list[int], int]:
    """(byte offset of each tensor, total bytes) of a packed bucket; both sides compute it the same way.

    >>> bucket_layout([TensorSpec("a", "bfloat16", (3,)), TensorSpec("b", "float32", (2,))])
    ([0, 8], 16)
    """
    offsets, pos = [], 0
    for s in specs:
        pos = -(-pos // ALIGN) * ALIGN
        offsets.append(pos)
        pos += s.nbytes
    return offsets, -(-pos // ALIGN) * ALIGN


def bucket_specs(tensors: Sequence[tuple[str, object]]) -> list[TensorSpec]:
    """The TensorSpec of each (name, tensor) of a bucket, in order: what its notice announces."""
    return [TensorSpec(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in tensors]


def pack_bucket(tensors: Sequence[tuple[str, object]], device=None, out=None):
    """(flat uint8 tensor, [TensorSpec]): every tensor's bytes at its aligned offset, in order.

    One `torch.cat` of byte views (alignment gaps zero-filled) instead of a copy per tensor. `out`: a
    uint8 buffer of at least the bucket's size on the same device to pack into (the flat tensor is then
    a view of it): a sender that reuses one buffer per bucket skips the allocation and its page faults.
    """
    import torch

    specs = bucket_specs(tensors)
    offsets, total = bucket_layout(specs)
    dev = device if device is not None else (tensors[0][1].device if tensors else "cpu")
    pieces, pos = [], 0
    for (_, t), spec, off in zip(tensors, specs, offsets):
        if off > pos:
            pieces.append(torch.zeros(off - pos, dtype=torch.uint8, device=dev))
        pieces.append(t.detach().reshape(-1).view(torch.uint8).to(dev))
        pos = off + spec.nbytes
    if total > pos:
        pieces.append(torch.zeros(total - pos, dtype=torch.uint8, device=dev))
    flat = (
        out[:total] if out is not None and out.numel() >= total else torch.empty(total, dtype=torch.uint8, device=dev)
    )
    if pieces:
        torch.cat(pieces, out=flat)
    return flat, specs


def unpack_bucket(flat, specs: Sequence[TensorSpec]) -> list[tuple[str, object]]:
    """Inverse of pack_bucket: views into `flat` (no copy), with each spec's dtype and shape."""
    import torch

    offsets, total = bucket_layout(specs)
    if total != flat.numel():
        raise BadRequest(f"bucket holds {flat.numel()} bytes but its tensors need {total}")
    return [
        (s.name, flat[off : off + s.nbytes].view(getattr(torch, s.dtype)).reshape(s.shape))
        for s, off in zip(specs, offsets)
    ]
