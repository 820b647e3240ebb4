"""vLLM server rollouts: the learner-side HTTP client and backend for `stage2 serve` servers.

Owns: the per-rank request chunk and per-server caps (chunking.py, from each server's cached
`/get_world_size/`), explicit (connect, read) timeouts on every call, retries of idempotent calls only
(health, world size, info, schema, /infer/ with its request id — never weight updates), typed errors
that carry the URL, status and a body excerpt, and weight sync after each optimizer step: rank 0 (the
sync owner) streams buckets of `bucket_size_mb` to every server over its weight-sync group, then
resets the prefix cache and checks the version each server reports. Every /infer/ carries the
version the learner pushed last, so a stale or restarted server is an error, never silent
off-policy data. `generate_chunks` hands rounds over as they finish (ChunkStream: a producer thread,
HTTP only, one round ahead) so the trainer can learn on round k while round k+1 decodes. torch is imported inside functions; requests is the only HTTP dependency.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence
from urllib.parse import urlparse

import requests

from toolkit.rollout.backends.base import DecodeSettings, Rollout
from toolkit.rollout.backends.vllm_colocate import WeightsFn, finish_rollout, sampling_dict
from toolkit.rollout.chunking import allocate_counts, per_rank_chunk, seed_base, server_caps

log = logging.getLogger(__name__)
TOKEN_ENV = "STAGE2_SERVE_TOKEN"
CONNECT_TIMEOUT_S = 10.0
RETRY_STATUSES = (502, 503, 504)
UNHEALTHY_PREFIX = "the rollout server is unhealthy"  # toolkit/rollout/server/engine.py: a wedged engine


class RolloutServerError(RuntimeError):
    """A rollout-server call failed; the message names the URL, the HTTP status and a body excerpt."""

    def __init__(self, message: str, *, url: str, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.url, self.status, self.body = url, status, body


class ServerUnavailableError(RolloutServerError):
    """The server did not answer (down, unreachable, or dead mid-call) within the timeouts and retries."""


class StaleWeightsError(RolloutServerError):
    """The server holds other weights than the learner pushed last (restarted, or an update failed)."""


class WeightSyncError(RolloutServerError):
    """Pushing weights failed (group port taken, version handshake mismatch, server error mid-sync)."""


def _detail(resp) -> str:
    try:
        return str(resp.json().get("detail", "")) or resp.text[:300]
    except (ValueError, AttributeError):
        return resp.text[:300]


def _says_unhealthy(resp) -> bool:
    """A 503 from a server that marked itself unhealthy (a wedged engine): retrying will not help."""
    if resp.status_code != 503:
        return False
    try:
        body = resp.json()
    except ValueError:
        return False
    return isinstance(body, dict) and (body.get("status") == "unhealthy"
                                       or str(body.get("detail", "")).startswith(UNHEALTHY_PREFIX))


class ServerClient:
    """One rollout server: typed calls with timeouts; only idempotent ones are retried."""

    def __init__(self, base_url: str, group_port: int, *, timeout_s: float, infer_timeout_s: float,
                 token: str | None = None, retries: int = 2, backoff_s: float = 1.0):
        self.base_url = base_url.rstrip("/")
        self.group_port = int(group_port)
        self.timeout_s, self.infer_timeout_s = float(timeout_s), float(infer_timeout_s)
        self.retries, self.backoff_s = retries, backoff_s
        self.session = requests.Session()
        self.session.trust_env = False  # servers are named explicitly; never route them through a proxy
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self._world_size: int | None = None
        self.group = None

    @property
    def host(self) -> str:
        return urlparse(self.base_url).hostname or "127.0.0.1"

    def request(self, method: str, path: str, body: dict | None = None, *, timeout_s: float, retry: bool,
                error_cls: type[RolloutServerError] = RolloutServerError) -> dict:
        url = self.base_url + path
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                resp = self.session.request(method, url, json=body, timeout=(min(CONNECT_TIMEOUT_S, timeout_s), timeout_s))
            except (requests.ConnectionError, requests.Timeout) as exc:
                if not last:
                    time.sleep(self.backoff_s * 2 ** attempt)
                    continue
                raise ServerUnavailableError(
                    f"{method} {url}: {type(exc).__name__} after {attempts} attempt(s) (timeout {timeout_s:g} s): "
                    f"{_first_line(exc)} (is the rollout server running? start it with `stage2 serve --profile …`, "
                    "or fix rollout_matching.vllm.server.servers[].base_url)", url=url) from None
            if resp.status_code in RETRY_STATUSES and not last and not _says_unhealthy(resp):
                time.sleep(self.backoff_s * 2 ** attempt)
                continue
            if resp.status_code >= 400:
                raise self._http_error(method, url, resp, error_cls)
            return resp.json()
        raise AssertionError("unreachable")

    def _http_error(self, method: str, url: str, resp, error_cls) -> RolloutServerError:
        body = resp.text[:500]
        kind = ""
        try:
            kind = resp.json().get("error", "")
        except ValueError:
            pass
        cls = StaleWeightsError if kind == "StaleWeights" else (ServerUnavailableError if resp.status_code == 503 else error_cls)
        if _says_unhealthy(resp):
            return cls(f"rollout server {self.base_url} is unhealthy: {_detail(resp)} ({method} {url}, HTTP 503; restart "
                       "`stage2 serve` — its log says more)", url=url, status=resp.status_code, body=body)
        return cls(f"{method} {url}: HTTP {resp.status_code}: {body}", url=url, status=resp.status_code, body=body)

    # ------------------------------------------------------------------ idempotent calls (retried)
    def wait_healthy(self, total_timeout_s: float | None = None, interval_s: float = 1.0) -> None:
        """Poll /health/ until it answers 200; raise ServerUnavailableError naming the URL and the wait."""
        total = self.timeout_s if total_timeout_s is None else total_timeout_s
        deadline = time.monotonic() + total
        detail = "no answer"
        while True:
            try:
                resp = self.session.get(self.base_url + "/health/", timeout=(min(CONNECT_TIMEOUT_S, total), total))
                if resp.status_code == 200:
                    return
                if resp.status_code == 503:  # up but unhealthy (a wedged engine, a dead worker): waiting will not help
                    raise ServerUnavailableError(
                        f"rollout server {self.base_url} is unhealthy: {_detail(resp)} (restart `stage2 serve` — its "
                        "log says more)", url=self.base_url + "/health/", status=503, body=resp.text[:500])
                detail = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except (requests.ConnectionError, requests.Timeout) as exc:
                detail = f"{type(exc).__name__}: {_first_line(exc)}"
            if time.monotonic() + interval_s > deadline:
                raise ServerUnavailableError(
                    f"rollout server {self.base_url} is not healthy after {total:g} s ({detail}); start it with "
                    "`stage2 serve --profile …` or fix rollout_matching.vllm.server.servers[].base_url "
                    "(rollout_matching.vllm.server.timeout_s sets this wait)", url=self.base_url + "/health/")
            time.sleep(interval_s)

    def world_size(self) -> int:
        if self._world_size is None:  # cached: the chunk arithmetic must not change mid-run
            self._world_size = int(self.request("GET", "/get_world_size/", timeout_s=self.timeout_s, retry=True)["world_size"])
        return self._world_size

    def info(self) -> dict:
        return self.request("GET", "/info/", timeout_s=self.timeout_s, retry=True)

    def weights_schema(self) -> dict | None:
        from toolkit.rollout.server.weight_sync import TensorSpec

        tensors = self.request("GET", "/weights_schema/", timeout_s=self.timeout_s, retry=True)["tensors"]
        return None if tensors is None else {t["name"]: TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in tensors}

    def infer(self, request_id: str, prompts: list[list[int]], sampling: list[dict], expect_version: int | None,
              images: list[list[str]] | None = None) -> list[dict]:
        body = {"request_id": request_id, "prompts": prompts, "sampling": sampling, "expect_weight_version": expect_version}
        if images is not None:  # absolute paths: the server reads them from the filesystem it shares with the learner
            body["images"] = images
        return self.request("POST", "/infer/", body, timeout_s=self.infer_timeout_s, retry=True)["outputs"]

    # ------------------------------------------------------------------ weight sync (never retried)
    def init_communicator(self, timeout_s: float | None = None) -> None:
        """Open this server's weight-sync group and join it as the last rank."""
        from toolkit.rollout.server.weight_sync import SyncGroup

        t = self.timeout_s if timeout_s is None else timeout_s
        world = self.world_size() + 1
        reply = self.request("POST", "/init_communicator/", {"port": self.group_port, "world_size": world, "timeout_s": t},
                             timeout_s=t, retry=False, error_cls=WeightSyncError)
        if reply["backend"] == "nccl":
            import torch

            if not torch.cuda.is_available():
                raise WeightSyncError(f"{self.base_url} syncs over NCCL but this learner has no GPU", url=self.base_url)
        group = SyncGroup(self.host, self.group_port, world, world - 1, reply["backend"], t)
        try:
            group.open_store(is_master=False)
            group.join()
        except Exception as exc:
            raise WeightSyncError(f"joining the weight-sync group of {self.base_url} at {self.host}:{self.group_port} "
                                  f"({reply['backend']}) failed: {exc}", url=self.base_url) from None
        self.group = group

    def update_weights(self, version: int, specs: list[dict], last: bool) -> None:
        self.request("POST", "/update_weights/", {"version": version, "tensors": specs, "last": last},
                     timeout_s=self.timeout_s, retry=False, error_cls=WeightSyncError)

    def reset_prefix_cache(self) -> int:
        return int(self.request("POST", "/reset_prefix_cache/", timeout_s=self.timeout_s, retry=False,
                                error_cls=WeightSyncError)["weight_version"])

    def close(self) -> None:
        if self.group is not None:
            try:
                self.request("POST", "/close_communicator/", timeout_s=min(self.timeout_s, 30.0), retry=False)
            except RolloutServerError as exc:
                log.warning("closing the weight-sync group of %s: %s", self.base_url, exc)
            self.group.close()
            self.group = None
        self.session.close()


class VLLMServerBackend:
    """Rollouts from one or more `stage2 serve` servers, chunked so no rollout GPU decodes more than
    decode_batch_size sequences per call; weights pushed by rank 0 after each optimizer step."""

    name = "vllm"

    def __init__(self, clients: list[ServerClient], settings: DecodeSettings, *, eos_id: int, rank: int = 0,
                 world_size: int = 1, weights: WeightsFn | None = None, object_key_ids: Sequence[int] = (),
                 bucket_size_mb: int = 256, device: str = "cpu"):
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
        log.info("rank %d: %d server(s) of world sizes %s; %d requests per round, caps %s", rank, len(clients), sizes,
                 self.chunk, self.caps)

    @classmethod
    def from_config(cls, rm: dict, settings: DecodeSettings, *, eos_id: int, rank: int, world_size: int,
                    weights: WeightsFn | None, object_key_ids: Sequence[int] = (), device: str = "cpu") -> "VLLMServerBackend":
        """Connect to every configured server (waiting up to timeout_s for health), check the learner's
        tensor names against each served checkpoint, and (rank 0) open the weight-sync groups."""
        srv = rm["vllm"]["server"]
        clients = [ServerClient(s["base_url"], s["group_port"], timeout_s=srv["timeout_s"],
                                infer_timeout_s=srv["infer_timeout_s"]) for s in srv["servers"]]
        for c in clients:
            c.wait_healthy()
        backend = cls(clients, settings, eos_id=eos_id, rank=rank, world_size=world_size, weights=weights,
                      object_key_ids=object_key_ids, bucket_size_mb=rm["vllm"]["sync"]["bucket_size_mb"], device=device)
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
        from toolkit.rollout.server.weight_sync import check_specs, specs_of

        learner = specs_of(self.weights("meta"))
        for i, c in enumerate(self.clients):
            self.schemas[i] = c.weights_schema()
            check_specs(learner, self.schemas[i], where=c.base_url)
        if self.rank == 0:
            for c in self.clients:
                c.init_communicator()

    # ------------------------------------------------------------------ rollouts
    def generate(self, prompts: Sequence[list[int]], *, step: int,
                 images: Sequence[Sequence[str]] | None = None) -> list[Rollout]:
        """Completions in order: rounds of `chunk` requests split over servers within their caps.
        `images`: None or one tuple of absolute image paths per prompt (see base.RolloutBackend)."""
        self.sync_weights(step)
        out: list[Rollout | None] = [None] * len(prompts)
        for idx, rollouts in self._rounds(prompts, step, images):
            for j, ro in zip(idx, rollouts):
                out[j] = ro
        return out  # type: ignore[return-value]

    def generate_chunks(self, prompts: Sequence[list[int]], *, step: int, background: bool = True,
                        images: Sequence[Sequence[str]] | None = None) -> "ChunkStream":
        """The same rounds as `generate`, handed over one at a time as (prompt indices, rollouts).

        The weight sync (collective under ZeRO-3, and the version all-reduce) runs here, on the
        caller's thread, before any round starts. With `background` the rounds then run in a producer
        thread that does HTTP only, one finished round ahead of the caller (see ChunkStream).
        """
        self.sync_weights(step)
        return ChunkStream(self._rounds(prompts, step, images), background=background)

    def _rounds(self, prompts: Sequence[list[int]], step: int,
                images: Sequence[Sequence[str]] | None = None) -> Iterator[tuple[list[int], list[Rollout]]]:
        prompts = [list(p) for p in prompts]
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries (give one tuple of paths per prompt)")
        images = None if images is None else [list(paths) for paths in images]
        call = next(self._calls)  # taken now, on the caller's thread: request ids stay per call
        expected = self.expected_version
        return (self._round(prompts, start, step, call, expected, images) for start in range(0, len(prompts), self.chunk))

    def _round(self, prompts: list[list[int]], start: int, step: int, call: int,
               expected: int | None, images: list[list[str]] | None = None) -> tuple[list[int], list[Rollout]]:
        """One round of up to `chunk` requests from `start`, allocated over servers within their caps."""
        base = seed_base(self.s.seed, step)
        jobs, offset = [], start
        for i, n in enumerate(allocate_counts(min(self.chunk, len(prompts) - start), self.caps)):
            if n:
                idx = list(range(offset, offset + n))
                sampling = [sampling_dict(self.s, self.eos_id, (base + j) & 0x7FFFFFFF) for j in idx]
                rid = f"{self.run_id}-r{self.rank}-s{step}-c{call}-o{offset}-srv{i}"
                paths = None if images is None else [images[j] for j in idx]
                jobs.append((i, idx, self._pool.submit(self.clients[i].infer, rid, [prompts[j] for j in idx],
                                                       sampling, expected, paths)))
            offset += n
        out_idx, out = [], []
        for i, idx, fut in jobs:
            outputs = fut.result()
            if len(outputs) != len(idx) or any(not _same_prompt(prompts[j], o["prompt_ids"], bool(images and images[j]))
                                               for j, o in zip(idx, outputs)):
                url = self.clients[i].base_url
                raise RolloutServerError(f"{url}/infer/ answered {len(outputs)} outputs that do not match the "
                                         f"{len(idx)} prompts sent (order or content)", url=url)
            out_idx += idx
            out += [self._rollout(i, o, expected) for o in outputs]
        return out_idx, out

    def _rollout(self, server: int, o: dict, expected: int | None) -> Rollout:
        if expected is not None and o["weight_version"] != expected:
            url = self.clients[server].base_url
            raise StaleWeightsError(f"{url} answered with weight version {o['weight_version']}, the learner pushed "
                                    f"{expected}", url=url)
        return finish_rollout(o["prompt_ids"], o["completion_ids"], eos_id=self.eos_id, rule=self.s.repeat,
                              key_ids=self.key_ids, weight_version=o["weight_version"])

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
            raise WeightSyncError("weight sync failed on the sync owner (rank 0); see its log",
                                  url=",".join(c.base_url for c in self.clients))
        if error is not None:
            raise error
        self.synced_step, self.expected_version = step, version
        self.last_sync_s = time.perf_counter() - t0

    def _push(self, version: int) -> None:
        from toolkit.rollout.server.weight_sync import checkpoint_name, iter_buckets, sendable

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
        from toolkit.rollout.server.weight_sync import bucket_specs

        for c in self.clients:
            if c.group is None:
                raise WeightSyncError(f"no weight-sync group with {c.base_url} (init_communicator failed?)", url=c.base_url)
        meta = [s.to_dict() for s in bucket_specs(bucket)]
        # The bucket is packed while the servers validate its notice: the copy leaves the sync's critical path.
        notices = [self._pool.submit(c.update_weights, version, meta, last) for c in self.clients]
        try:
            flat = self._pack(bucket)
        finally:
            for notice in notices:  # every notice answered (the first error raised) before any byte moves
                notice.result()
        handshakes = [self._pool.submit(c.reset_prefix_cache) for c in self.clients] if last else []
        works = [(c, c.group.broadcast_async(flat.to(self.device if c.group.backend == "nccl" else "cpu"),
                                             src=c.group.world_size - 1)) for c in self.clients]
        for c, work in works:
            c.group.wait(work)
        for c, handshake in zip(self.clients, handshakes):
            got = handshake.result()
            if got != version:
                raise WeightSyncError(f"{c.base_url} reports weight version {got} after the push of version {version}",
                                      url=c.base_url)
        return int(flat.numel())

    def _pack(self, bucket):
        """The bucket as one flat byte tensor; on CPU packed into a buffer kept between syncs (no allocation)."""
        from toolkit.rollout.server.weight_sync import pack_bucket

        flat, _ = pack_bucket(bucket, out=self._flat)
        if flat.device.type == "cpu" and (self._flat is None or flat.numel() > self._flat.numel()):
            self._flat = flat  # GPU buckets are not kept: there memory is scarcer than an allocation is slow
        return flat

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class ChunkStream:
    """Rollout rounds as they finish: iterate for (prompt indices, rollouts), one round at a time.

    background=True: a daemon producer thread runs the rounds into a queue holding at most `depth`
    finished rounds, so round k+1 decodes while the caller trains on round k. The producer does HTTP
    and rollout post-processing only — never a torch.distributed collective (those are not
    thread-safe beside the learner's, and every rank must issue them in the same order). Whatever it
    raises (ServerUnavailableError, StaleWeightsError, …) is re-raised, unchanged, by the caller's
    next `next()`. background=False: the same rounds, run inline by `next()` (the serial reference).
    `wait_s` is the time the caller spent blocked in `next()`.
    """

    def __init__(self, rounds: Iterator, *, background: bool, depth: int = 1):
        self._rounds = rounds
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._done = False
        self.wait_s = 0.0
        if background:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._produce, name="rollout-producer", daemon=True)
            self._thread.start()

    def __iter__(self) -> "ChunkStream":
        return self

    def __next__(self) -> tuple[list[int], list[Rollout]]:
        if self._done:
            raise StopIteration
        t0 = time.perf_counter()
        try:
            kind, item = ("chunk", next(self._rounds, None)) if self._queue is None else self._queue.get()
        finally:
            self.wait_s += time.perf_counter() - t0
        if kind == "chunk" and item is not None:
            return item
        self._done = True
        if self._thread is not None:
            self._thread.join()
        if kind == "error":
            raise item
        raise StopIteration

    def _produce(self) -> None:
        try:
            for item in self._rounds:
                if not self._put(("chunk", item)):
                    return  # the consumer closed the stream
            self._put(("end", None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(("error", exc))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        """Stop the producer after its current round (a caller that stops early, e.g. on an error)."""
        self._done = True
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=1.0)
            if self._thread.is_alive():
                log.warning("rollout producer still waiting on a server answer; it exits when that call returns")


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


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:300] if text else type(exc).__name__
