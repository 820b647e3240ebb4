"""One data-parallel rank of the rollout server: a spawned process that owns one vLLM engine.

Talks to the parent (`engine.py`) over a `multiprocessing` Pipe: first `{"status": "ready"}` (or
`{"status": "failed", "error": …}`), then one reply per command that asks for one. Commands are
small dicts `{"id", "method", "kwargs", "reply"}`; every reply carries the engine's weight version.
The weight-sync join never blocks the command loop while it waits for the learner: `join_group` only
arms a deadline, the loop checks between commands (every 0.2 s) whether the learner has announced
itself in the store, and builds the group then (quick: everyone is there). A learner that never comes
costs nothing but the open store until the deadline, when the group is closed.
A command sent without `reply` (weight-sync group join, bucket receive) reports a failure on the next
replied weight-sync command (`reset_prefix_cache`, the learner's handshake) — never on a generate,
which has nothing to do with it. A failed join closes the group (its store stops listening); a bucket
that arrives with no group leaves the weights, and so the version, as they were; a bucket that failed
while loading leaves the version unknown (-1), so no rollout claims to come from weights it does not
hold. A generate that fails inside vLLM is reported as `broken` (the engine's state is unknown).
torch and vLLM are imported inside functions (spawn imports this module in the child before the
environment is set).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
import traceback

log = logging.getLogger(__name__)
UNKNOWN_VERSION = -1
JOIN_POLL_S = 0.2


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the engine dies with the server even on SIGKILL (no orphaned GPU memory)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def worker_main(spec: dict, dp_rank: int, conn) -> None:
    """Process entry point: set the environment, build the engine, then serve commands until shutdown."""
    _die_with_parent()
    os.environ.update(spec["env"][dp_rank])
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s [serve dp{dp_rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        runtime = WorkerRuntime(spec, dp_rank)
    except BaseException as exc:  # report any start failure to the parent, then exit
        conn.send(
            {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-4000:]}
        )
        return
    conn.send({"status": "ready", "pid": os.getpid(), "vocab_size": runtime.vocab_size})
    runtime.serve(conn)


class WorkerRuntime:
    def __init__(self, spec: dict, dp_rank: int):
        from toolkit.config.settings import VllmSettings
        from toolkit.rollout.vllm_engine import create_llm, engine_kwargs, ensure_process_group
        from toolkit.vlm.inputs import image_pad_id

        self.dp_rank = dp_rank
        self.tp = spec["tp"]
        on_cpu = spec["device"] == "cpu"
        if self.tp == 1:  # in-process engine: no EngineCore/Worker children, tensors load directly
            ensure_process_group()
        kw = engine_kwargs(
            VllmSettings(**spec["vllm"]),
            model=spec["model"],
            dtype=spec["dtype"],
            seed=spec["seed"],
            on_cpu=on_cpu,
            executor="external_launcher" if self.tp == 1 else "mp",
            extension=True,
        )
        self.llm = create_llm(kw, on_cpu=on_cpu)
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.store_host = spec.get("store_host", "127.0.0.1")
        self.image_pad_id = image_pad_id(spec["model"])  # None: a text model
        self.version = 0
        self.caches_fresh = False  # no request decoded since the last cache reset
        self.pending_error: dict | None = None
        self.joined = False  # a weight-sync group is joined and can receive buckets
        self.join_deadline: float | None = None  # a join waits for the learner until then
        self.join_timeout_s = 0.0

    # ------------------------------------------------------------------ loop
    def serve(self, conn) -> None:
        while True:
            try:
                if self.join_deadline is not None and not conn.poll(JOIN_POLL_S):
                    self.advance_join()
                    continue
                msg = conn.recv()
            except (EOFError, OSError):
                return  # parent gone
            if msg["method"] == "shutdown":
                self.close_group()
                return
            reply = {"id": msg["id"], "ok": True}
            try:
                if msg["method"] == "open_store":  # a new group: an old group's failure is moot
                    self.pending_error = None
                if msg["reply"] and msg["method"] in REPORTS_SYNC_ERRORS and self.pending_error is not None:
                    err, self.pending_error = self.pending_error, None
                    raise _Deferred(err)
                reply["result"] = getattr(self, msg["method"])(**msg["kwargs"])
            except _Deferred as d:
                reply.update(ok=False, **d.err)
            except _EngineFailed as exc:
                err = {"kind": "Unavailable", "error": _text(exc), "broken": True}
                log.error("dp%d %s failed inside vLLM: %s", self.dp_rank, msg["method"], err["error"])
                reply.update(ok=False, **err)
            except Exception as exc:
                err = {"kind": _kind(exc), "error": _text(exc)}
                log.error("dp%d %s failed: %s", self.dp_rank, msg["method"], err["error"])
                if msg["method"] == "receive_bucket" and not isinstance(exc, NoGroup):
                    self.version = UNKNOWN_VERSION
                if not msg["reply"] and self.pending_error is None:  # the first failure is the cause
                    self.pending_error = err
                reply.update(ok=False, **err)
            if msg["reply"]:
                reply["version"] = self.version
                conn.send(reply)

    # ------------------------------------------------------------------ commands
    def generate(
        self,
        prompts: list[list[int]],
        sampling: list[dict],
        expect_version: int | None,
        images: list[list[str]] | None = None,
    ) -> list[dict]:
        from toolkit.rollout.errors import BadRequest, StaleWeights
        from toolkit.rollout.vllm_engine import engine_prompt, paths_per_prompt, to_sampling_params

        if expect_version is not None and expect_version != self.version:
            raise StaleWeights(
                f"holds weight version {self.version}, the learner expects "
                f"{expect_version} (a restarted server, or a weight update that did not complete)"
            )
        try:  # SamplingParams checks its own ranges; image pads collapsed + images read (the same path as colocate)
            params = [to_sampling_params(s) for s in sampling]
            per_prompt = paths_per_prompt(images, len(prompts))
            inputs = [engine_prompt(p, paths, self.image_pad_id) for p, paths in zip(prompts, per_prompt)]
        except (ValueError, TypeError, OverflowError) as exc:  # a bad knob, an unreadable image, pads without images
            raise BadRequest(str(exc)) from None
        except Exception as exc:  # e.g. PIL's DecompressionBombError: still the request's image, not the engine
            raise BadRequest(f"{type(exc).__name__}: {exc}") from None
        self.caches_fresh = False
        try:
            results = self.llm.generate(inputs, params, use_tqdm=False)
        except Exception as exc:
            raise self._generate_failure(exc) from None
        return [
            {
                "prompt_ids": list(r.prompt_token_ids),
                "completion_ids": list(r.outputs[0].token_ids),
                "text": "",
                "finish_reason": str(r.outputs[0].finish_reason),
                "weight_version": self.version,
            }
            for r in results
        ]

    def _generate_failure(self, exc: Exception) -> Exception:
        """vLLM rejects a request it cannot take with a ValueError and withdraws what it had added: a 400.
        Anything else, or requests left behind in the engine, leaves its state unknown: broken."""
        text = f"{type(exc).__name__}: {_text(exc)}"
        try:
            leftover = self.llm.llm_engine.has_unfinished_requests()
        except Exception:  # the engine cannot even say: assume the worst
            leftover = True
        if isinstance(exc, (ValueError, TypeError)) and not leftover:
            from toolkit.rollout.errors import BadRequest

            return BadRequest(f"vLLM refused the request: {text}")
        return _EngineFailed(f"generate failed inside vLLM: {text}")

    def open_store(self, port: int, world_size: int, backend: str, timeout_s: float) -> list[int]:
        self.close_group()
        return self._rpc(
            "stage2_open_store",
            host=connect_host(self.store_host),
            bind_host=self.store_host,
            port=port,
            world_size=world_size,
            rank_base=self.dp_rank * self.tp,
            backend=backend,
            timeout_s=timeout_s,
        )

    def join_group(self, timeout_s: float) -> None:
        """Wait (without blocking the loop) up to `timeout_s` for the learner, then join; see advance_join."""
        self.join_deadline = time.monotonic() + timeout_s
        self.join_timeout_s = timeout_s

    def advance_join(self) -> None:
        """Join once the learner has announced itself; close the group when it has not by the deadline. A
        failure is kept for the learner's next handshake (reset_prefix_cache), never given to a generate."""
        try:
            ready = all(self._as_list(self._rpc("stage2_peer_ready")))
            if not ready and time.monotonic() < self.join_deadline:
                return
            self.join_deadline = None
            if not ready:
                raise TimeoutError(f"the learner did not join within {self.join_timeout_s:g} s")
            self._rpc("stage2_join_group")
            self.joined = True
        except Exception as exc:  # close the store now; report on the next weight-sync call
            self.join_deadline = None
            self.close_group()
            self.pending_error = {
                "kind": "Conflict",
                "error": (
                    f"the weight-sync join failed, so the group was closed: {_text(exc)} "
                    "(fix: POST /init_communicator/ again and join the group within its timeout_s)"
                ),
            }
            log.error("dp%d: %s", self.dp_rank, self.pending_error["error"])

    @staticmethod
    def _as_list(result) -> list:
        return result if isinstance(result, list) else [result]

    def receive_bucket(self, specs: list[dict], nbytes: int, version: int, last: bool) -> None:
        from toolkit.rollout.vllm_engine import reset_caches

        if not self.joined:  # nothing received, nothing loaded: the weights and the version stay as they are
            raise NoGroup("no joined weight-sync group on this rank (fix: POST /init_communicator/ and join it first)")
        self._rpc("stage2_receive_bucket", specs=specs, nbytes=nbytes)
        if last:  # prefix cache and cached vision embeddings were computed with the old weights
            reset_caches(self.llm)
            self.caches_fresh = True
            self.version = version
            log.info("dp%d: weight version %d loaded", self.dp_rank, version)

    def reset_prefix_cache(self) -> int:
        from toolkit.rollout.vllm_engine import reset_caches

        if not self.caches_fresh:  # the learner's handshake right after a last bucket needs no second reset
            reset_caches(self.llm)
            self.caches_fresh = True
        return self.version

    def close_group(self) -> None:
        self.joined, self.pending_error, self.join_deadline = False, None, None
        try:
            self._rpc("stage2_close_group")
        except Exception as exc:  # closing must not fail the caller
            log.warning("dp%d: closing the weight-sync group: %s", self.dp_rank, _text(exc))

    def _rpc(self, method: str, **kwargs):
        return self.llm.collective_rpc(method, kwargs=kwargs)


def connect_host(bind_host: str) -> str:
    """Where this host's other ranks reach a store bound to `bind_host` (a wildcard is reached on loopback).

    >>> connect_host("0.0.0.0"), connect_host("::"), connect_host("10.0.0.5")
    ('127.0.0.1', '::1', '10.0.0.5')
    """
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "localhost": "127.0.0.1"}.get(bind_host, bind_host)


REPORTS_SYNC_ERRORS = ("reset_prefix_cache",)  # replied weight-sync commands


class NoGroup(Exception):
    """No joined weight-sync group (a 409: the learner must open and join one first)."""


class _EngineFailed(Exception):
    """vLLM failed while generating already-checked requests."""


class _Deferred(Exception):
    def __init__(self, err: dict):
        super().__init__(err["error"])
        self.err = err


def _kind(exc: Exception) -> str:
    from toolkit.rollout import errors

    name = type(exc).__name__
    if isinstance(exc, NoGroup):
        return "Conflict"
    if hasattr(errors, name):
        return name
    text = str(exc)
    if "group_port" in text and "already in use" in text:  # raised inside a TP worker, re-wrapped by vLLM
        return "Conflict"
    return "EngineError"


def _text(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 2000 else text[:2000] + " …"
