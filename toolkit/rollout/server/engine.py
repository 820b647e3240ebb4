"""The serving engine behind `create_app`: one spawned vLLM worker per data-parallel rank.

Owns the worker processes (spawn, readiness handshake, shutdown with a timeout, then terminate), the
split of each /infer/ batch across DP ranks (near-equal contiguous shares, the remainder rotated so no
rank is starved or always favoured), command timeouts, and the weight-sync bookkeeping (which group
is open, which version each rank reported). Blocking calls only: the app runs them in threads.
Imports no torch and no vLLM (the workers do).

Hostile input (docs/VLLM.md "Request limits"): every request is checked against the served model
before a worker sees it (token ids < vocab size, prompt within max_model_len, image paths under the
allowed roots after realpath: `image_paths.py`). A generate that overruns its deadline, or fails inside vLLM, leaves
that engine in an unknown state: the server is then marked unhealthy (/health/ 503 with the reason)
and every later call fails fast with 503 instead of queueing behind it; restart the server.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

from toolkit.config.settings import VllmSettings
from toolkit.rollout import errors
from toolkit.rollout.chunking import split_counts
from toolkit.rollout.server.image_paths import check_image_paths
from toolkit.rollout.vllm_engine import served_specs
from toolkit.rollout.weight_sync import TensorSpec, bucket_layout, dtype_size

log = logging.getLogger(__name__)
POLL_S = 0.2
STOP_WAIT_S = 3.0  # per stage of close(): shutdown message, then SIGTERM, then SIGKILL (a busy server ends in < 10 s)


@dataclass(frozen=True)
class EngineSpec:
    """Everything a DP worker needs, as plain data (it crosses the spawn boundary)."""

    model: str
    dtype: str
    vllm: VllmSettings  # its tensor_parallel_size is `tp`
    seed: int
    dp: int = 1
    tp: int = 1
    device: str = "cpu"  # "cpu" | "cuda"
    gpus: tuple[int, ...] = ()  # physical ids, dp × tp of them on GPU
    env: tuple[dict, ...] = field(default=())  # per DP rank; filled by worker_env()
    store_host: str = "127.0.0.1"  # where the weight-sync store binds: the HTTP bind address

    def to_dict(self) -> dict:
        """Plain data for the spawned workers (`vllm` becomes a dict; the worker rebuilds VllmSettings)."""
        return asdict(self)


def worker_env(spec: EngineSpec) -> tuple[dict, ...]:
    """Per-DP-rank environment: its GPU slice (none on CPU) and one OpenMP thread on CPU.

    >>> spec = EngineSpec("m", "bfloat16", None, 0, dp=2, tp=2, device="cuda", gpus=(4, 5, 6, 7))
    >>> [e["CUDA_VISIBLE_DEVICES"] for e in worker_env(spec)]
    ['4,5', '6,7']
    """
    out = []
    for rank in range(spec.dp):
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if spec.tp == 1 else "1"}
        if spec.device == "cpu":
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, spec.gpus[rank * spec.tp : (rank + 1) * spec.tp]))
        out.append(env)
    return tuple(out)


class _Worker:
    def __init__(self, rank: int, proc, conn):
        self.rank, self.proc, self.conn = rank, proc, conn
        self.lock = threading.Lock()
        self.version = 0


class DPEngine:
    """Blocking engine API used by the FastAPI app (see app.py for the endpoint contract)."""

    def __init__(self, spec: EngineSpec, *, start_timeout_s: float = 900.0, image_roots: tuple[str, ...] = ()):
        self.spec = spec if spec.env else replace(spec, env=worker_env(spec))
        self.start_timeout_s = start_timeout_s
        self.image_roots = tuple(image_roots)
        self.vocab_size: int | None = None  # reported by the workers when ready
        self.broken: str | None = None  # why the engine can no longer be trusted (health says so)
        self.workers: list[_Worker] = []
        self.schema = served_specs(spec.model)  # under the learner's names (a VLM's differ from the files')
        self._ids = itertools.count(1)
        self._rotate = itertools.count()
        self._pool = ThreadPoolExecutor(max_workers=max(4, 4 * spec.dp), thread_name_prefix="dp-call")
        self._group: dict | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Spawn every DP worker and wait until all report ready; a failed start names the rank and error."""
        ctx = mp.get_context("spawn")
        from toolkit.rollout.server.worker import worker_main

        spec = self.spec.to_dict()
        for rank in range(self.spec.dp):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(spec, rank, child), name=f"stage2-serve-dp{rank}", daemon=False
            )
            proc.start()
            child.close()
            self.workers.append(_Worker(rank, proc, parent))
        t0 = time.monotonic()
        try:
            for w in self.workers:
                msg = self._wait_ready(w, t0 + self.start_timeout_s)
                log.info("dp%d ready (pid %s) after %.1f s", w.rank, msg.get("pid"), time.monotonic() - t0)
                vocab = msg.get("vocab_size")
                self.vocab_size = vocab if self.vocab_size is None else min(self.vocab_size, vocab)
        except Exception:
            self.close()
            raise

    def _wait_ready(self, w: _Worker, deadline: float) -> dict:
        while time.monotonic() < deadline:
            if w.conn.poll(POLL_S):
                msg = w.conn.recv()
                if msg.get("status") == "ready":
                    return msg
                raise RuntimeError(
                    f"rollout server dp rank {w.rank} failed to start its engine: {msg.get('error')}\n"
                    f"{msg.get('trace', '')}"
                )
            if not w.proc.is_alive():
                raise RuntimeError(f"rollout server dp rank {w.rank} exited with code {w.proc.exitcode} while starting")
        raise RuntimeError(f"rollout server dp rank {w.rank} was not ready within {self.start_timeout_s:g} s")

    def begin_close(self) -> None:
        """Refuse new calls and end waiting ones (503) within a poll; safe from a signal handler."""
        self._closed = True

    def close(self) -> None:
        """Ask every worker to stop; SIGTERM what still runs after 3 s (a worker busy in generate never
        reads the message), SIGKILL after 3 more: a busy server ends well within 10 s."""
        if self.workers and all(not w.proc.is_alive() and w.proc.exitcode is not None for w in self.workers):
            self._closed = True
            return
        self._closed = True
        for w in self.workers:
            if w.lock.acquire(timeout=1.0):  # a waiting _call lets go within a poll once _closed is set
                try:
                    w.conn.send({"id": 0, "method": "shutdown", "kwargs": {}, "reply": False})
                except (OSError, EOFError, BrokenPipeError):
                    pass
                finally:
                    w.lock.release()
        deadline = time.monotonic() + STOP_WAIT_S
        for w in self.workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
        for w in self.workers:
            if w.proc.is_alive():
                log.warning("dp%d did not stop within %g s: terminating", w.rank, STOP_WAIT_S)
                w.proc.terminate()
        deadline = time.monotonic() + STOP_WAIT_S
        for w in self.workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(1.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ worker calls
    def _call(self, w: _Worker, method: str, kwargs: dict, timeout_s: float):
        """Send one command and wait for its reply (stale replies of timed-out calls are skipped)."""
        with w.lock:
            self._check_alive(w)
            cid = next(self._ids)
            w.conn.send({"id": cid, "method": method, "kwargs": kwargs, "reply": True})
            deadline = time.monotonic() + timeout_s
            while True:
                if w.conn.poll(POLL_S):
                    msg = w.conn.recv()
                    if msg.get("id") != cid:
                        continue
                    w.version = msg.get("version", w.version)
                    if msg["ok"]:
                        return msg.get("result")
                    if msg.get("broken"):  # vLLM itself failed mid-generate: its state is unknown
                        self.mark_broken(f"dp rank {w.rank} failed inside the engine: {msg['error']}")
                    raise getattr(errors, msg.get("kind", "EngineError"), errors.EngineError)(
                        f"dp rank {w.rank}: {msg['error']}"
                    )
                self._check_alive(w)
                if time.monotonic() > deadline:
                    if method == "generate":  # still busy: every later request would queue behind it
                        self.mark_broken(f"dp rank {w.rank} did not finish a generate within {timeout_s:g} s")
                    raise errors.Timeout(f"dp rank {w.rank} did not answer {method} within {timeout_s:g} s")

    def mark_broken(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason + " (the engine may be wedged; restart the rollout server)"
            log.error("marking the server unhealthy: %s", self.broken)

    def _send(self, w: _Worker, method: str, kwargs: dict) -> None:
        with w.lock:
            self._check_alive(w)
            w.conn.send({"id": next(self._ids), "method": method, "kwargs": kwargs, "reply": False})

    def _check_alive(self, w: _Worker) -> None:
        if self._closed:
            raise errors.Unavailable("the rollout server is shutting down")
        if self.broken is not None:
            raise errors.Unavailable(f"the rollout server is unhealthy: {self.broken}")
        if not w.proc.is_alive():
            raise errors.Unavailable(f"dp rank {w.rank} (pid {w.proc.pid}) exited with code {w.proc.exitcode}")

    def _on_all(self, method: str, kwargs: dict, timeout_s: float) -> list:
        futures = [self._pool.submit(self._call, w, method, kwargs, timeout_s) for w in self.workers]
        return [f.result() for f in futures]

    # ------------------------------------------------------------------ the app's API
    def health(self) -> tuple[bool, str]:
        dead = [f"dp rank {w.rank} exited with code {w.proc.exitcode}" for w in self.workers if not w.proc.is_alive()]
        if self._closed:
            return False, "shutting down"
        if self.broken is not None:
            dead.append(self.broken)
        return (not dead), "; ".join(dead)

    def world_size(self) -> int:
        return self.spec.dp * self.spec.tp

    def info(self) -> dict:
        return {
            "model": self.spec.model,
            "max_model_len": int(self.spec.vllm.max_model_len),
            "dtype": self.spec.dtype,
            "weight_version": min(w.version for w in self.workers),
            "device": self.spec.device,
            "data_parallel_size": self.spec.dp,
            "tensor_parallel_size": self.spec.tp,
        }

    def weights_schema(self) -> list[dict] | None:
        return None if self.schema is None else [s.to_dict() for s in self.schema.values()]

    def infer(
        self,
        prompts: list[list[int]],
        sampling: list[dict],
        expect_version: int | None,
        timeout_s: float,
        images: list[list[str]] | None = None,
    ) -> list[dict]:
        """Decode `prompts` split over the DP ranks; outputs in prompt order. `images`: per prompt, the
        absolute paths of its images (checked here, read by the workers)."""
        sampling = self.check_request(prompts, sampling)
        if images is not None:
            images = check_image_paths(images, len(prompts), self.image_roots)
        if self.broken is not None:
            raise errors.Unavailable(f"the rollout server is unhealthy: {self.broken}")
        counts = split_counts(len(prompts), len(self.workers), start=next(self._rotate) % len(self.workers))
        futures, start = [], 0
        for w, n in zip(self.workers, counts):
            if n:
                kw = {
                    "prompts": prompts[start : start + n],
                    "sampling": sampling[start : start + n],
                    "expect_version": expect_version,
                    "images": None if images is None else images[start : start + n],
                }
                futures.append(self._pool.submit(self._call, w, "generate", kw, timeout_s))
            start += n
        return [out for f in futures for out in f.result()]

    def check_request(self, prompts: list[list[int]], sampling: list[dict]) -> list[dict]:
        """One sampling dict per prompt, checked against the served model (400 naming the field): every
        token id < vocab size, prompt shorter than max_model_len, max_tokens ≤ max_model_len. max_tokens is
        cut to what the prompt leaves (vLLM would stop there anyway, finish_reason "length")."""
        if len(sampling) == 1:
            sampling = sampling * len(prompts)
        if len(sampling) != len(prompts):
            raise errors.BadRequest(
                f"{len(prompts)} prompts but {len(sampling)} sampling entries (send 1 or one per prompt)"
            )
        limit = int(self.spec.vllm.max_model_len)
        vocab = self.vocab_size
        out = []
        for i, (p, s) in enumerate(zip(prompts, sampling)):
            if not p:
                raise errors.BadRequest(f"prompts[{i}] is empty (send at least one token id)")
            if len(p) >= limit:
                raise errors.BadRequest(f"prompts[{i}] has {len(p)} tokens; max_model_len is {limit}")
            if s["max_tokens"] > limit:
                raise errors.BadRequest(f"sampling[{i}].max_tokens {s['max_tokens']} exceeds max_model_len {limit}")
            if vocab is not None:
                bad = next((t for t in p if not 0 <= t < vocab), None)
                if bad is not None:
                    raise errors.BadRequest(f"prompts[{i}] holds token id {bad}, outside the vocabulary [0, {vocab})")
                bad = next((t for t in s["stop_token_ids"] if not 0 <= t < vocab), None)
                if bad is not None:
                    raise errors.BadRequest(
                        f"sampling[{i}].stop_token_ids holds {bad}, outside the vocabulary [0, {vocab})"
                    )
            out.append({**s, "max_tokens": min(s["max_tokens"], limit - len(p))})
        return out

    def init_communicator(self, port: int, world_size: int, backend: str | None, timeout_s: float) -> dict:
        """Open the weight-sync store on rank 0 (fails fast if `port` is taken), then let every rank join."""
        want = self.world_size() + 1
        if world_size != want:
            raise errors.BadRequest(
                f"world_size {world_size} != server world size {self.world_size()} + 1 learner = {want}"
            )
        backend = backend or ("nccl" if self.spec.device == "cuda" else "gloo")
        if backend == "nccl" and self.spec.device != "cuda":
            raise errors.BadRequest("backend nccl needs a GPU server; this one runs on CPU (use gloo)")
        kw = {"port": port, "world_size": world_size, "backend": backend, "timeout_s": timeout_s}
        try:
            for w in self.workers:  # rank 0 first: it binds the store the others connect to
                self._call(w, "open_store", kw, timeout_s)
        except errors.EngineError:
            self._close_quietly()  # no store left listening after a failed open
            raise
        for w in self.workers:  # each joins when the learner arrives (after this answer); one that has not by
            self._send(w, "join_group", {"timeout_s": timeout_s})  # timeout_s closes the group; /infer/ runs meanwhile
        self._group = {"backend": backend, "world_size": world_size, "learner_rank": world_size - 1, "port": port}
        log.info("weight-sync group: %s", self._group)
        return dict(self._group)

    def update_weights(self, version: int, tensors: list[dict], last: bool) -> dict:
        """Validate one bucket's metadata, then let every rank receive it (the learner broadcasts next)."""
        if self._group is None:
            raise errors.Conflict("no weight-sync group (fix: POST /init_communicator/ first)")
        specs = [TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in tensors]
        self._check_bucket(specs)
        nbytes = bucket_layout(specs)[1]
        kw = {"specs": [s.to_dict() for s in specs], "nbytes": nbytes, "version": version, "last": last}
        for w in self.workers:
            self._send(w, "receive_bucket", kw)
        return {"accepted": True, "version": version, "nbytes": nbytes}

    def _check_bucket(self, specs: list[TensorSpec]) -> None:
        problems = []
        for s in specs:
            dtype_size(s.dtype)
            known = self.schema.get(s.name) if self.schema is not None else s
            if known is None:
                problems.append(f"unknown tensor {s.name}")
            elif tuple(known.shape) != tuple(s.shape):
                problems.append(f"{s.name}: shape {list(s.shape)} != served {list(known.shape)}")
        if problems:
            raise errors.BadRequest(
                "; ".join(problems[:12]) + (f" … ({len(problems)} in all)" if len(problems) > 12 else "")
            )

    def reset_prefix_cache(self, timeout_s: float) -> int:
        """Reset every rank's prefix cache after pending weight buckets; returns the version all hold."""
        versions = self._on_all("reset_prefix_cache", {}, timeout_s)
        if len(set(versions)) != 1:
            raise errors.EngineError(f"dp ranks hold different weight versions {versions}")
        return versions[0]

    def close_communicator(self, timeout_s: float) -> None:
        self._on_all("close_group", {}, timeout_s)
        self._group = None

    def _close_quietly(self) -> None:
        self._group = None
        for w in self.workers:
            try:
                self._call(w, "close_group", {}, 30.0)
            except errors.EngineError as exc:
                log.warning("dp%d: closing the weight-sync group after a failed open: %s", w.rank, exc)
