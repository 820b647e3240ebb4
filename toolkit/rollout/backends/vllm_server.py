"""vLLM server rollouts: the learner-side backend for `stage2 serve` servers (HTTP client: rollout/client.py).

Owns: the per-rank request chunk and per-server caps (chunking.py, from each server's cached
`/get_world_size/`), rounds split over servers, and weight sync after each optimizer step: rank 0 (the
sync owner) streams buckets of `bucket_size_mb` to every server over its weight-sync group, then
resets the prefix cache and checks the version each server reports. Every /infer/ carries the
version the learner pushed last, so a stale or restarted server is an error, never silent
off-policy data. `generate_chunks` hands rounds over as they finish (ChunkStream: a producer thread,
HTTP only, one round ahead) so the trainer can learn on round k while round k+1 decodes. torch is
imported inside functions.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from toolkit.config.settings import DecodeSettings, ServerSettings
from toolkit.rollout.backends.base import Rollout
from toolkit.rollout.backends.chunk_stream import ChunkStream
from toolkit.rollout.chunking import allocate_counts, per_rank_chunk, seed_base, server_caps
from toolkit.rollout.client import RolloutServerError, ServerClient, StaleWeightsError, WeightSyncError
from toolkit.rollout.completions import finish_rollout, sampling_dict
from toolkit.rollout.weight_sync import (
    WeightsFn,
    bucket_specs,
    check_specs,
    checkpoint_name,
    iter_buckets,
    pack_bucket,
    sendable,
    specs_of,
)

log = logging.getLogger(__name__)


class VLLMServerBackend:
    """Rollouts from one or more `stage2 serve` servers, chunked so no rollout GPU decodes more than
    decode_batch_size sequences per call; weights pushed by rank 0 after each optimizer step."""

    name = "vllm"

    def __init__(
        self,
        clients: list[ServerClient],
        settings: DecodeSettings,
        *,
        eos_id: int,
        rank: int = 0,
        world_size: int = 1,
        weights: WeightsFn | None = None,
        object_key_ids: Sequence[int] = (),
        bucket_size_mb: int = 256,
        device: str = "cpu",
    ):
        self.clients = clients
        self.s = settings
        self.eos_id = eos_id
        self.rank, self.world = rank, world_size
        self.weights = weights
        self.key_ids = frozenset(object_key_ids)
        self.bucket_bytes = int(bucket_size_mb) << 20
        self.device = device
        sizes = [c.world_size() for c in clients]
        self.chunk = per_rank_chunk(settings.decode_batch_size, sizes, world_size)
        self.caps = server_caps(settings.decode_batch_size, sizes, world_size, rank)
        self.run_id = uuid.uuid4().hex[:8]
        self._calls = itertools.count()
        self._pool = ThreadPoolExecutor(max_workers=max(2, len(clients)), thread_name_prefix="rollout-http")
        self.schemas: list[dict | None] = [None] * len(clients)
        self.synced_step: int | None = None
        self.expected_version: int | None = None
        self.last_sync_s = 0.0
        self.last_sync_bytes = 0
        self._flat = None  # the CPU bucket buffer, reused by every sync
        log.info(
            "rank %d: %d server(s) of world sizes %s; %d requests per round, caps %s",
            rank,
            len(clients),
            sizes,
            self.chunk,
            self.caps,
        )

    @classmethod
    def from_settings(
        cls,
        server: ServerSettings,
        settings: DecodeSettings,
        *,
        bucket_size_mb: int,
        eos_id: int,
        rank: int,
        world_size: int,
        weights: WeightsFn | None,
        object_key_ids: Sequence[int] = (),
        device: str = "cpu",
    ) -> VLLMServerBackend:
        """Connect to every configured server (waiting up to timeout_s for health), check the learner's
        tensor names against each served checkpoint, and (rank 0) open the weight-sync groups."""
        clients = [
            ServerClient(s.base_url, s.group_port, timeout_s=server.timeout_s, infer_timeout_s=server.infer_timeout_s)
            for s in server.servers
        ]
        for c in clients:
            c.wait_healthy()
        backend = cls(
            clients,
            settings,
            eos_id=eos_id,
            rank=rank,
            world_size=world_size,
            weights=weights,
            object_key_ids=object_key_ids,
            bucket_size_mb=bucket_size_mb,
            device=device,
        )
        try:
            backend.connect_weight_sync()
        except BaseException:
            backend.close()
            raise
        return backend

    def connect_weight_sync(self) -> None:
        """Name/shape check against every server (all ranks: collective under ZeRO-3), then rank 0 joins the groups."""
        if self.weights is None:
            return
        learner = specs_of(self.weights("meta"))
        for i, c in enumerate(self.clients):
            self.schemas[i] = c.weights_schema()
            check_specs(learner, self.schemas[i], where=c.base_url)
        if self.rank == 0:
            for c in self.clients:
                c.init_communicator()

    # ------------------------------------------------------------------ rollouts
    def generate(
        self, prompts: Sequence[list[int]], *, step: int, images: Sequence[Sequence[str]] | None = None
    ) -> list[Rollout]:
        """Completions in order: rounds of `chunk` requests split over servers within their caps.
        `images`: None or one tuple of absolute image paths per prompt (see base.RolloutBackend)."""
        self.sync_weights(step)
        out: list[Rollout | None] = [None] * len(prompts)
        for idx, rollouts in self._rounds(prompts, step, images):
            for j, ro in zip(idx, rollouts):
                out[j] = ro
        return out  # type: ignore[return-value]

    def generate_chunks(
        self,
        prompts: Sequence[list[int]],
        *,
        step: int,
        background: bool = True,
        images: Sequence[Sequence[str]] | None = None,
    ) -> ChunkStream:
        """The same rounds as `generate`, handed over one at a time as (prompt indices, rollouts).

        The weight sync (collective under ZeRO-3, and the version all-reduce) runs here, on the
        caller's thread, before any round starts. With `background` the rounds then run in a producer
        thread that does HTTP only, one finished round ahead of the caller (see ChunkStream).
        """
        self.sync_weights(step)
        return ChunkStream(self._rounds(prompts, step, images), background=background)

    def _rounds(
        self, prompts: Sequence[list[int]], step: int, images: Sequence[Sequence[str]] | None = None
    ) -> Iterator[tuple[list[int], list[Rollout]]]:
        prompts = [list(p) for p in prompts]
        if images is not None and len(images) != len(prompts):
            raise ValueError(
                f"{len(prompts)} prompts but {len(images)} image entries (give one tuple of paths per prompt)"
            )
        images = None if images is None else [list(paths) for paths in images]
        call = next(self._calls)  # taken now, on the caller's thread: request ids stay per call
        expected = self.expected_version
        return (
            self._round(prompts, start, step, call, expected, images) for start in range(0, len(prompts), self.chunk)
        )

    def _round(
        self,
        prompts: list[list[int]],
        start: int,
        step: int,
        call: int,
        expected: int | None,
        images: list[list[str]] | None = None,
    ) -> tuple[list[int], list[Rollout]]:
        """One round of up to `chunk` requests from `start`, allocated over servers within their caps."""
        base = seed_base(self.s.seed, step)
        jobs, offset = [], start
        for i, n in enumerate(allocate_counts(min(self.chunk, len(prompts) - start), self.caps)):
            if n:
                idx = list(range(offset, offset + n))
                sampling = [sampling_dict(self.s, self.eos_id, (base + j) & 0x7FFFFFFF) for j in idx]
                rid = f"{self.run_id}-r{self.rank}-s{step}-c{call}-o{offset}-srv{i}"
                paths = None if images is None else [images[j] for j in idx]
                jobs.append(
                    (
                        i,
                        idx,
                        self._pool.submit(
                            self.clients[i].infer, rid, [prompts[j] for j in idx], sampling, expected, paths
                        ),
                    )
                )
            offset += n
        out_idx, out = [], []
        for i, idx, fut in jobs:
            outputs = fut.result()
            if len(outputs) != len(idx) or any(
                not _same_prompt(prompts[j], o["prompt_ids"], bool(images and images[j])) for j, o in zip(idx, outputs)
            ):
                url = self.clients[i].base_url
                raise RolloutServerError(
                    f"{url}/infer/ answered {len(outputs)} outputs that do not match the "
                    f"{len(idx)} prompts sent (order or content)",
                    url=url,
                )
            out_idx += idx
            out += [self._rollout(i, o, expected) for o in outputs]
        return out_idx, out

    def _rollout(self, server: int, o: dict, expected: int | None) -> Rollout:
        if expected is not None and o["weight_version"] != expected:
            url = self.clients[server].base_url
            raise StaleWeightsError(
                f"{url} answered with weight version {o['weight_version']}, the learner pushed {expected}", url=url
            )
        return finish_rollout(
            o["prompt_ids"],
            o["completion_ids"],
            eos_id=self.eos_id,
            rule=self.s.repeat,
            key_ids=self.key_ids,
            weight_version=o["weight_version"],
        )

    # ------------------------------------------------------------------ weight sync
    def sync_weights(self, step: int) -> None:
        """Push the learner's weights (after `step` optimizer steps) as version step+1, unless pushed already.

        Every rank calls it (the ZeRO-3 gather is collective); rank 0 sends. The outcome is agreed with
        one all-reduce so a failed push stops every rank, not only the owner.
        """
        if self.weights is None or step == self.synced_step:
            return
        version = step + 1
        error: BaseException | None = None
        t0 = time.perf_counter()
        try:
            if self.rank == 0:
                self._push(version)
            else:
                for _ in self.weights("meta"):  # join the owner's gathers without copying data
                    pass
        except Exception as exc:
            error = exc
        if not _all_ranks_ok(error is None) and error is None:
            raise WeightSyncError(
                "weight sync failed on the sync owner (rank 0); see its log",
                url=",".join(c.base_url for c in self.clients),
            )
        if error is not None:
            raise error
        self.synced_step, self.expected_version = step, version
        self.last_sync_s = time.perf_counter() - t0

    def _push(self, version: int) -> None:
        served = self.schemas[0]
        named = ((checkpoint_name(n), t) for n, t in self.weights(self.device))
        it = iter_buckets(((n, t) for n, t in named if sendable(n, served)), self.bucket_bytes)
        sent, pending = 0, None
        try:
            for bucket in it:  # one bucket of look-ahead: the last one carries `last: true`
                if pending is not None:
                    sent += self._send_bucket(pending, version, last=False)
                pending = bucket
            if pending is not None:
                sent += self._send_bucket(pending, version, last=True)
        finally:
            for _ in it:  # after a failure, keep joining ZeRO-3 gathers so other ranks are not stranded
                pass
        self.last_sync_bytes = sent
        log.info("weight sync v%d: %.1f MB to %d server(s)", version, sent / 2**20, len(self.clients))

    def _send_bucket(self, bucket, version: int, last: bool) -> int:
        """Announce the bucket to every server (each validates it before any byte moves), broadcast it to all
        servers at once, and with the last bucket run the version handshake.

        The handshake (`/reset_prefix_cache/`) is requested BEFORE the last broadcast: the server queues it
        behind the bucket and answers once the bucket is loaded, so its HTTP round trip overlaps the
        broadcast and the server's load instead of following them.
        """
        for c in self.clients:
            if c.group is None:
                raise WeightSyncError(
                    f"no weight-sync group with {c.base_url} (init_communicator failed?)", url=c.base_url
                )
        meta = [s.to_dict() for s in bucket_specs(bucket)]
        # The bucket is packed while the servers validate its notice: the copy leaves the sync's critical path.
        notices = [self._pool.submit(c.update_weights, version, meta, last) for c in self.clients]
        try:
            flat = self._pack(bucket)
        finally:
            for notice in notices:  # every notice answered (the first error raised) before any byte moves
                notice.result()
        handshakes = [self._pool.submit(c.reset_prefix_cache) for c in self.clients] if last else []
        works = [
            (
                c,
                c.group.broadcast_async(
                    flat.to(self.device if c.group.backend == "nccl" else "cpu"), src=c.group.world_size - 1
                ),
            )
            for c in self.clients
        ]
        for c, work in works:
            c.group.wait(work)
        for c, handshake in zip(self.clients, handshakes):
            got = handshake.result()
            if got != version:
                raise WeightSyncError(
                    f"{c.base_url} reports weight version {got} after the push of version {version}", url=c.base_url
                )
        return int(flat.numel())

    def _pack(self, bucket):
        """The bucket as one flat byte tensor; on CPU packed into a buffer kept between syncs (no allocation)."""
        flat, _ = pack_bucket(bucket, out=self._flat)
        if flat.device.type == "cpu" and (self._flat is None or flat.numel() > self._flat.numel()):
            self._flat = flat  # GPU buckets are not kept: there memory is scarcer than an allocation is slow
        return flat

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _all_ranks_ok(ok: bool) -> bool:
    """MIN over the learner's ranks (one small all-reduce); True on a single process."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _same_prompt(sent: list[int], got: list[int], has_images: bool) -> bool:
    """Is `got` the server's answer to `sent`? Image prompts may come back with another number of image pads
    (vLLM expands them itself; the learner's parity check drops such samples), so compare runs collapsed."""
    if not has_images:
        return got == sent
    runs = lambda ids: [t for k, t in enumerate(ids) if k == 0 or ids[k - 1] != t]  # noqa: E731
    return runs(got) == runs(sent)
