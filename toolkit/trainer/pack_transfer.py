"""Shipping a padding pack from one rank to the ranks that hold none (toolkit/trainer/engine.py pads short
ranks with zero-weight packs). The pack travels through `broadcast_object_list` with its tensors on CPU and
is rebuilt as the same dataclass / namedtuple / dict, each tensor back on the device it came from.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Shipped:
    """A tensor in transit to another rank: on CPU, with where it lived (CUDA tensors unpickle on the sender's GPU)."""

    tensor: torch.Tensor
    on_accelerator: bool


def broadcast_pack(pad, src: int, rank: int, device: torch.device):
    """`pad` from rank `src` on every rank; ranks that hold a pad keep their own (collective)."""
    import torch.distributed as dist

    box = [map_tensors(pad, lambda t: Shipped(t.detach().cpu(), t.device.type != "cpu")) if rank == src else None]
    dist.broadcast_object_list(box, src=src)
    if pad is not None:
        return pad
    return map_tensors(box[0], lambda s: s.tensor.to(device) if s.on_accelerator else s.tensor, leaf=Shipped)


def map_tensors(obj, fn, leaf=torch.Tensor):
    """`fn` over every `leaf` in dicts, lists, tuples, namedtuples and dataclass instances."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn, leaf) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(v, fn, leaf) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn, leaf) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_tensors(getattr(obj, f.name), fn, leaf) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj
