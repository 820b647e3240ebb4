"""HTTP probes of a rollout server for the launcher: health, world size, model info (read-only GETs).

Owns the launcher's side of the server protocol: `GET /health/` → 200, `GET /get_world_size/` →
`{"world_size": n}`, `GET /info/` → `{"model": …, "max_model_len": …, "weight_version": …}`. Every
request has an explicit timeout, proxies are bypassed (`trust_env=False`: the servers the launcher
talks to are named explicitly) and only these idempotent GETs are made. Must never import torch,
transformers, deepspeed, vllm or fastapi.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import requests

HEALTH_TIMEOUT_S = 2.0
CALL_TIMEOUT_S = 10.0


class ProbeError(RuntimeError):
    """A server call failed; the message carries the URL, the status and a body excerpt."""


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # never route launcher→server calls through a proxy
    token = os.environ.get("STAGE2_SERVE_TOKEN")
    if token:  # a server bound off loopback wants it on every endpoint but /health/
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def get_json(base_url: str, path: str, timeout: float = CALL_TIMEOUT_S) -> Any:
    """GET base_url+path and decode JSON; raises ProbeError naming the URL, status and body excerpt."""
    url = base_url.rstrip("/") + path
    try:
        with _session() as session:
            resp = session.get(url, timeout=timeout)
    except requests.RequestException as exc:
        raise ProbeError(f"GET {url}: {type(exc).__name__}: {exc}") from None
    if resp.status_code != 200:
        raise ProbeError(f"GET {url}: HTTP {resp.status_code}: {resp.text[:200]!r}")
    try:
        return resp.json()
    except ValueError:
        raise ProbeError(f"GET {url}: HTTP 200 but the body is not JSON: {resp.text[:200]!r}") from None


def health(base_url: str, timeout: float = HEALTH_TIMEOUT_S) -> tuple[bool, str]:
    """(healthy, detail): healthy iff `GET /health/` answers 200; detail says what happened otherwise."""
    url = base_url.rstrip("/") + "/health/"
    try:
        with _session() as session:
            resp = session.get(url, timeout=timeout)
    except requests.ConnectionError:
        return False, "connection refused"
    except requests.Timeout:
        return False, f"no answer within {timeout:g} s"
    except requests.RequestException as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return resp.status_code == 200, f"HTTP {resp.status_code}"


def world_size(base_url: str, timeout: float = CALL_TIMEOUT_S) -> int:
    """The server's rollout world size (DP × TP) from `GET /get_world_size/`."""
    data = get_json(base_url, "/get_world_size/", timeout)
    value = data.get("world_size") if isinstance(data, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProbeError(
            f'GET {base_url.rstrip("/")}/get_world_size/: expected {{"world_size": int}}, got {data!r:.200}'
        )
    return value


@dataclass(frozen=True)
class Expectation:
    """What the plan expects of one server."""

    world_size: int | None  # None: not planned by this launch (an external server): any positive size
    model: str
    min_model_len: int  # conservative prompt estimate + max_new_tokens (see required_model_len)


def required_model_len(global_max_length: int, max_new_tokens: int) -> int:
    """Tokens the server's max_model_len must hold.

    Conservative prompt estimate: the trainer only trains on sequences up to global_max_length, so a
    prompt may use up to `global_max_length - max_new_tokens` tokens and still leave room for a full
    completion; prompt estimate + max_new_tokens = global_max_length. Tokenizing the data would be
    exact but needs the tokenizer (and a pass over the data) before any process starts.
    """
    return max(global_max_length - max_new_tokens, 0) + max_new_tokens


def _same_model(served: str, expected: str) -> bool:
    if served == expected:
        return True
    if os.path.isabs(expected) and os.path.exists(expected) and os.path.exists(served):
        return os.path.realpath(served) == os.path.realpath(expected)
    return served.rstrip("/") == expected.rstrip("/")


def verify_server(base_url: str, want: Expectation, timeout: float = CALL_TIMEOUT_S) -> list[str]:
    """Every mismatch between a healthy server and the plan, as sentences with a fix (empty = ok)."""
    problems = []
    size = world_size(base_url, timeout)
    if want.world_size is not None and size != want.world_size:
        problems.append(
            f"{base_url}: /get_world_size/ says {size}, the plan has DP×TP = {want.world_size} "
            "(fix: restart the server with matching --dp/--tp, or change --server-dp/--server-tp)"
        )
    elif size < 1:
        problems.append(f"{base_url}: /get_world_size/ says {size}; expected ≥ 1")
    info = get_json(base_url, "/info/", timeout)
    if not isinstance(info, dict):
        return problems + [f"{base_url}: /info/ returned {info!r:.200}, expected an object"]
    model, length = info.get("model"), info.get("max_model_len")
    if not isinstance(model, str) or not _same_model(model, want.model):
        problems.append(
            f"{base_url}: serves model {model!r} but the profile's model.model is {want.model!r} "
            "(fix: start the server with this profile, or point model.model at the served model)"
        )
    if not isinstance(length, int) or length < want.min_model_len:
        problems.append(
            f"{base_url}: max_model_len {length!r} < {want.min_model_len} needed (prompt estimate + max_new_tokens) "
            "(fix: raise rollout_matching.vllm.max_model_len, or lower global_max_length/max_new_tokens)"
        )
    return problems
