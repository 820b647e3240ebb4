"""`ChunkStream`: rollout rounds handed over as they finish, optionally from a producer thread.

The server backend's `generate_chunks` returns one, so the trainer learns on round k while round k+1
decodes. Imports nothing heavy.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

from toolkit.rollout.backends.base import Rollout

log = logging.getLogger(__name__)


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

    def __iter__(self) -> ChunkStream:
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
