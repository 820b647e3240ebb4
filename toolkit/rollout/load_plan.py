"""Weight loading into a vLLM model as recorded copies: vLLM's `load_weights` once per name, then replays.

vLLM's `load_weights` finds each checkpoint tensor's place in Python, tensor by tensor (name mapping, the
stacked qkv and gate/up parameters, tensor-parallel shards): 100-200 µs a tensor, most of a server sync of a
small model (docs/PERFORMANCE.md "Item 5"). For one name, dtype and shape the place never changes. So the
first load of a name runs vLLM's loader under a recorder that notes every `copy_` into the model's parameters
and buffers, checks that the copies reproduce what vLLM wrote, and later loads of that name replay the copies.

A name whose loading does anything else — copies from a temporary (a dtype or layout change done before the
copy), mutates a parameter in place, replaces a parameter — is loaded by vLLM's own loader every time. A
recorded name goes back to vLLM's loader the moment its target parameter's storage changes (vLLM re-allocated
it), or its incoming tensor's dtype, shape or strides differ from the recorded one.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger(__name__)

UNSUPPORTED = None  # an entry value: this name always goes through vLLM's loader
RECORD_BYTES = 256 * 2**20  # names recorded per `load_weights` call: bounds what is held at once (ZeRO-3)
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load_weights(model, named: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Load (checkpoint name, tensor) pairs into the vLLM `model`; returns how many tensors were taken."""
    plan = _PLANS.get(model)
    if plan is None:
        plan = _PLANS[model] = LoadPlan(model)
    return plan.load(named)


def plan_of(model) -> LoadPlan | None:
    return _PLANS.get(model)


@dataclass(frozen=True)
class _Owner:
    """Where a copy lands: `module.<attr>`, whose storage was at `ptr` when recorded."""

    module: torch.nn.Module
    attr: str
    ptr: int

    def current(self) -> bool:
        t = self.module._parameters.get(self.attr)
        if t is None:
            t = self.module._buffers.get(self.attr)
        return t is not None and t.untyped_storage().data_ptr() == self.ptr


@dataclass(frozen=True)
class _Copy:
    """`dst.copy_(view of the incoming tensor)`; the view is kept relative to the tensor's storage offset."""

    dst: torch.Tensor  # the view of the parameter vLLM copied into
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def source(self, t: torch.Tensor) -> torch.Tensor:
        return t.as_strided(self.size, self.stride, t.storage_offset() + self.offset)

    def apply(self, t: torch.Tensor) -> None:
        self.dst.copy_(self.source(t))

    def holds(self, t: torch.Tensor) -> bool:
        return torch.equal(self.dst, self.source(t).to(self.dst.dtype).expand_as(self.dst))


@dataclass(frozen=True)
class _Fill:
    """`dst.fill_(value)`: vLLM zeroes the padded rows of a vocabulary-parallel embedding this way."""

    dst: torch.Tensor
    value: float

    def apply(self, t: torch.Tensor) -> None:  # noqa: ARG002 - one signature for every write
        self.dst.fill_(self.value)

    def holds(self, t: torch.Tensor) -> bool:  # noqa: ARG002
        return bool((self.dst == self.value).all())


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    writes: tuple[_Copy | _Fill, ...]
    owners: tuple[_Owner, ...]

    def fits(self, t: torch.Tensor) -> bool:
        return (
            t.dtype == self.dtype
            and tuple(t.shape) == self.shape
            and tuple(t.stride()) == self.stride
            and all(o.current() for o in self.owners)
        )


class LoadPlan:
    """name → recorded copies (or UNSUPPORTED) for one model; `load` replays or records (module docstring)."""

    def __init__(self, model):
        self.model = model
        self.entries: dict[str, _Entry | None] = {}
        self.replayed = self.recorded = self.unsupported = 0  # tensors, over this plan's life

    def load(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        n, todo, todo_bytes, dsts, srcs = 0, [], 0, [], []
        with torch.no_grad():
            for name, t in named:
                n += 1
                entry = self.entries.get(name, False)
                if entry and entry.fits(t):
                    for w in entry.writes:
                        if isinstance(w, _Copy) and w.dst.shape == w.size:  # batched below
                            dsts.append(w.dst)
                            srcs.append(w.source(t))
                        else:
                            w.apply(t)
                    self.replayed += 1
                    continue
                todo.append((name, t, entry is UNSUPPORTED))
                todo_bytes += t.numel() * t.element_size()
                if todo_bytes >= RECORD_BYTES:
                    self._load(todo)
                    todo, todo_bytes = [], 0
            if todo:
                self._load(todo)
            if dsts:  # one call for every replayed copy: the per-copy Python cost was most of a small model's load
                torch._foreach_copy_(dsts, srcs)
        return n

    def _load(self, todo: list[tuple[str, torch.Tensor, bool]]) -> None:
        """vLLM's loader for these tensors: the names known to be unsupported plainly, the rest recorded."""
        known_bad = [(name, t) for name, t, bad in todo if bad]
        fresh = [(name, t) for name, t, bad in todo if not bad]
        if known_bad:
            self.model.load_weights(iter(known_bad))
            self.unsupported += len(known_bad)
        if not fresh:
            return
        owners = model_storages(self.model)
        recorder = _Recorder([t for _, t in fresh], set(owners))
        with recorder:
            self.model.load_weights(recorder.track(fresh))
        left = []
        for i, (name, t) in enumerate(fresh):
            self.entries[name] = entry = _make_entry(t, recorder, i, owners)
            if entry is UNSUPPORTED:
                left.append(f"{name} ({recorder.why(i)})")
        self.recorded += len(fresh) - len(left)
        self.unsupported += len(left)
        if left:
            log.info("%d of %d tensors stay with vLLM's loader: %s", len(left), len(fresh), "; ".join(left[:3]))


def model_storages(model) -> dict[int, _Owner]:
    """Storage pointer → owner of every non-empty parameter and buffer of `model`."""
    out = {}
    for module in model.modules():
        for attr, t in (*module._parameters.items(), *module._buffers.items()):
            if t is not None and t.untyped_storage().nbytes() > 0:
                ptr = t.untyped_storage().data_ptr()
                out.setdefault(ptr, _Owner(module, attr, ptr))
    return out


def _make_entry(t: torch.Tensor, recorder: _Recorder, i: int, owners: dict[int, _Owner]) -> _Entry | None:
    if recorder.broken or i in recorder.bad:
        return UNSUPPORTED
    writes = recorder.writes.get(i, [])
    if any(w.dst.untyped_storage().data_ptr() not in owners for w in writes):
        recorder.bad[i] = "a parameter was replaced while loading"
        return UNSUPPORTED
    if not all(w.holds(t) for w in writes):
        recorder.bad[i] = "the recorded writes do not reproduce what vLLM's loader wrote"
        return UNSUPPORTED
    used = {owners[w.dst.untyped_storage().data_ptr()] for w in writes}
    return _Entry(t.dtype, tuple(t.shape), tuple(t.stride()), tuple(writes), tuple(used))


class _Recorder(TorchDispatchMode):
    """Notes each write into a model storage during one `load_weights` call, by incoming tensor: a `copy_` from
    a view of an incoming tensor (found by its bytes), or a constant fill (credited to the tensor vLLM took
    last). Any other write into a model storage makes the whole call unsupported."""

    FILLS = (torch.ops.aten.fill_.Scalar, torch.ops.aten.zero_.default)

    def __init__(self, incoming: list[torch.Tensor], model_ptrs: set[int]):
        super().__init__()
        self.incoming, self.model_ptrs = incoming, model_ptrs
        self.writes: dict[int, list[_Copy | _Fill]] = {}
        self.bad: dict[int, str] = {}
        self.broken: str | None = None
        self.current: int | None = None  # the incoming tensor vLLM took last
        self.spans: dict[int, list[tuple[int, int, int]]] = {}  # storage ptr → (first byte, end byte, index)
        for i, t in enumerate(incoming):
            self.spans.setdefault(t.untyped_storage().data_ptr(), []).append((*_byte_span(t), i))

    def track(self, named: list[tuple[str, torch.Tensor]]):
        for i, pair in enumerate(named):
            self.current = i
            yield pair

    def why(self, i: int) -> str:
        return self.broken or self.bad.get(i, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._schema.is_mutable and self.broken is None:
            written = [t for t in _written(func, args, kwargs) if self._is_model(t)]
            if written:
                self._note(func, written[0], args)
        return out

    def _is_model(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self.model_ptrs

    def _note(self, func, dst: torch.Tensor, args) -> None:
        if func is torch.ops.aten.copy_.default and isinstance(args[1], torch.Tensor):
            self._copy(dst, args[1])
        elif func in self.FILLS and self.current is not None:
            value = args[1] if func is torch.ops.aten.fill_.Scalar else 0
            self.writes.setdefault(self.current, []).append(_Fill(dst, value))
        else:
            self.broken = f"{func} writes a parameter in place"

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        start, end = _byte_span(src)
        spans = self.spans.get(src.untyped_storage().data_ptr(), ())
        hits = [i for a, b, i in spans if a <= start and end <= b]
        if len(hits) != 1:
            self.broken = "a parameter was copied from a tensor that is not an incoming one (a converted copy?)"
            return
        i, t = hits[0], self.incoming[hits[0]]
        if src.dtype != t.dtype:
            self.bad[i] = f"copied as {src.dtype}, sent as {t.dtype}"
            return
        rel = src.storage_offset() - t.storage_offset()
        self.writes.setdefault(i, []).append(_Copy(dst, tuple(src.shape), tuple(src.stride()), rel))


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes in place (its schema's mutable arguments, `out=` included)."""
    out = []
    for k, arg in enumerate(func._schema.arguments):
        value = args[k] if k < len(args) else kwargs.get(arg.name)
        if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
            out.append(value)
    return out


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte) of a view in its storage."""
    start = t.storage_offset() * t.element_size()
    if t.numel() == 0:
        return start, start
    extent = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return start, start + extent * t.element_size()
