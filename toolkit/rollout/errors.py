"""Errors the rollout server's engine and the weight-sync group raise, and the HTTP status each maps to.

Shared by `server/` (which answers with the status) and `weight_sync.py`/`sync_group.py` (used by both
sides), so it lives beside them rather than inside the server. Imports nothing heavy.
"""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base of serving-engine errors; `status` is the HTTP status the app answers with."""

    status = 500


class BadRequest(EngineError):
    """The request cannot be served as sent (unknown weight names, wrong shapes, wrong world size)."""

    status = 400


class StaleWeights(EngineError):
    """The engine holds another weight version than the learner expects."""

    status = 409


class Conflict(EngineError):
    """A resource is busy or taken (the weight-sync group port, a second communicator)."""

    status = 409


class Unavailable(EngineError):
    """A DP worker died or the engine is shutting down."""

    status = 503


class Timeout(EngineError):
    """A DP worker did not answer within the request's timeout."""

    status = 504
