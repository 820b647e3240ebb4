"""Weight sync shared by the learner and the rollout server: tensor specs, buckets, the broadcast group.

Owns: which names a served checkpoint holds (read from safetensors headers, no tensor loaded), the
learner-vs-server name/shape check, byte-exact bucket packing, and the weight-sync process group —
a `TCPStore` + `ProcessGroupGloo` (CPU) or `ProcessGroupNCCL` (GPU) built WITHOUT touching the
default process group (the learner's torchrun group and the server's vLLM group stay untouched). The
server's rank 0 hosts the store on `group_port`, bound to the address the HTTP server binds (a
socket we bind and hand to torch: torch's own store would listen on every interface); the learner
joins as the last rank and broadcasts.
torch is imported inside functions only, so the app and the client import this module cheaply.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from toolkit.rollout.errors import BadRequest, Conflict, EngineError

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
LEARNER_READY_KEY = "stage2_learner_ready"
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


# ------------------------------------------------------------------ the weight-sync group


def listen_fd(host: str, port: int, group_port: int) -> int:
    """A listening TCP socket on exactly (host, port), as a file descriptor torch's store takes over."""
    host = "127.0.0.1" if host == "localhost" else host
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise EngineError(f"cannot resolve the weight-sync bind address {host!r}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of a closed group only
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise Conflict(
                f"weight-sync group_port {group_port} is already in use on the server host "
                "(fix: give this server another rollout_matching.vllm.server.servers[].group_port, "
                "or stop the process holding it)"
            ) from None
        raise EngineError(f"could not bind the weight-sync store at {host}:{port}: {exc.strerror or exc}") from None
    return sock.detach()  # torch owns it now and closes it with the store


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class SyncGroup:
    """One weight-sync process group (learner = last rank), independent of any default process group."""

    def __init__(self, host: str, port: int, world_size: int, rank: int, backend: str, timeout_s: float):
        self.host, self.port, self.world_size, self.rank = host, port, world_size, rank
        self.backend = backend
        self.timeout = datetime.timedelta(seconds=float(timeout_s))
        self.store = None
        self.pg = None

    def open_store(self, is_master: bool, bind_host: str | None = None) -> None:
        """Bind (master, on `bind_host`, default `host`) or reach the rendezvous store. Fails fast, naming
        the port, when it is taken."""
        import torch.distributed as dist

        fd = listen_fd(bind_host or self.host, self.port, self.port) if is_master else None
        try:
            self.store = dist.TCPStore(
                self.host,
                self.port,
                self.world_size,
                is_master=is_master,
                wait_for_workers=False,
                timeout=self.timeout,
                master_listen_fd=fd,
            )
        except Exception as exc:  # DistNetworkError / RuntimeError, depending on the failure
            if fd is not None:
                _close_fd(fd)
            text = str(exc)
            if is_master and ("EADDRINUSE" in text or "address already in use" in text.lower()):
                raise Conflict(
                    f"weight-sync group_port {self.port} is already in use on the server host "
                    "(fix: give this server another rollout_matching.vllm.server.servers[].group_port, "
                    "or stop the process holding it)"
                ) from None
            role = "bind" if is_master else "reach"
            raise EngineError(
                f"could not {role} the weight-sync store at {self.host}:{self.port} within "
                f"{self.timeout.total_seconds():g} s: {text.splitlines()[0] if text else type(exc).__name__}"
            ) from None

    def join(self) -> None:
        """Build the process group (blocks until every rank, the learner included, has joined). The learner
        first announces itself in the store, so server ranks wait for it without blocking (peer_ready)."""
        import torch
        import torch.distributed as dist

        if self.rank == self.world_size - 1:
            self.store.set(LEARNER_READY_KEY, "1")
        store = dist.PrefixStore("stage2_weight_sync", self.store)
        if self.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, self.rank, self.world_size, self.timeout)
        elif self.backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            self.pg = dist.ProcessGroupNCCL(store, self.rank, self.world_size, opts)
            # NCCL connects lazily: one tiny broadcast makes join() mean "connected" on every rank.
            probe = torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()))
            self.broadcast(probe, src=self.world_size - 1)
        else:
            raise BadRequest(f"weight-sync backend must be gloo or nccl, got {self.backend!r}")

    def peer_ready(self) -> bool:
        """True once the learner (the last rank) has started its join; never blocks."""
        if self.store is None:
            raise EngineError("weight-sync store is not open (fix: POST /init_communicator/ first)")
        return bool(self.store.check([LEARNER_READY_KEY]))

    def broadcast(self, tensor, src: int) -> None:
        self.wait(self.broadcast_async(tensor, src))

    def broadcast_async(self, tensor, src: int):
        """Start a broadcast and return its work handle (finish it with `wait`)."""
        import torch.distributed as dist

        if self.pg is None:
            raise EngineError("weight-sync group is not initialized (fix: POST /init_communicator/ first)")
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        return self.pg.broadcast([tensor], opts)

    def wait(self, work) -> None:
        work.wait()
        if self.backend == "nccl":
            import torch

            torch.cuda.synchronize()

    def close(self) -> None:
        pg, self.pg, self.store = self.pg, None, None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:  # a peer may be gone already; closing must not fail
                pass
