"""The learner's HTTP client for one `stage2 serve` rollout server, and the errors its calls raise.

Owns: explicit (connect, read) timeouts on every call, retries of idempotent calls only (health, world
size, info, schema, /infer/ with its request id — never weight updates), typed errors that carry the
URL, status and a body excerpt, the bearer token (STAGE2_SERVE_TOKEN), and joining a server's
weight-sync group. requests is the only HTTP dependency; torch is imported inside functions.
The endpoint contract is the server's (server/app.py, docs/VLLM.md "Protocol").
"""

from __future__ import annotations

import logging
import os
import time
from urllib.parse import urlparse

import requests

from toolkit.rollout.sync_group import SyncGroup
from toolkit.rollout.weight_sync import TensorSpec

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
    return isinstance(body, dict) and (
        body.get("status") == "unhealthy" or str(body.get("detail", "")).startswith(UNHEALTHY_PREFIX)
    )


class ServerClient:
    """One rollout server: typed calls with timeouts; only idempotent ones are retried."""

    def __init__(
        self,
        base_url: str,
        group_port: int,
        *,
        timeout_s: float,
        infer_timeout_s: float,
        token: str | None = None,
        retries: int = 2,
        backoff_s: float = 1.0,
    ):
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

    def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        *,
        timeout_s: float,
        retry: bool,
        error_cls: type[RolloutServerError] = RolloutServerError,
    ) -> dict:
        url = self.base_url + path
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                resp = self.session.request(
                    method, url, json=body, timeout=(min(CONNECT_TIMEOUT_S, timeout_s), timeout_s)
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                if not last:
                    time.sleep(self.backoff_s * 2**attempt)
                    continue
                raise ServerUnavailableError(
                    f"{method} {url}: {type(exc).__name__} after {attempts} attempt(s) (timeout {timeout_s:g} s): "
                    f"{_first_line(exc)} (is the rollout server running? start it with `stage2 serve --profile …`, "
                    "or fix rollout_matching.vllm.server.servers[].base_url)",
                    url=url,
                ) from None
            if resp.status_code in RETRY_STATUSES and not last and not _says_unhealthy(resp):
                time.sleep(self.backoff_s * 2**attempt)
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
        cls = (
            StaleWeightsError
            if kind == "StaleWeights"
            else (ServerUnavailableError if resp.status_code == 503 else error_cls)
        )
        if _says_unhealthy(resp):
            return cls(
                f"rollout server {self.base_url} is unhealthy: {_detail(resp)} ({method} {url}, HTTP 503; restart "
                "`stage2 serve` — its log says more)",
                url=url,
                status=resp.status_code,
                body=body,
            )
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
                        "log says more)",
                        url=self.base_url + "/health/",
                        status=503,
                        body=resp.text[:500],
                    )
                detail = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except (requests.ConnectionError, requests.Timeout) as exc:
                detail = f"{type(exc).__name__}: {_first_line(exc)}"
            if time.monotonic() + interval_s > deadline:
                raise ServerUnavailableError(
                    f"rollout server {self.base_url} is not healthy after {total:g} s ({detail}); start it with "
                    "`stage2 serve --profile …` or fix rollout_matching.vllm.server.servers[].base_url "
                    "(rollout_matching.vllm.server.timeout_s sets this wait)",
                    url=self.base_url + "/health/",
                )
            time.sleep(interval_s)

    def world_size(self) -> int:
        if self._world_size is None:  # cached: the chunk arithmetic must not change mid-run
            self._world_size = int(
                self.request("GET", "/get_world_size/", timeout_s=self.timeout_s, retry=True)["world_size"]
            )
        return self._world_size

    def info(self) -> dict:
        return self.request("GET", "/info/", timeout_s=self.timeout_s, retry=True)

    def weights_schema(self) -> dict | None:
        tensors = self.request("GET", "/weights_schema/", timeout_s=self.timeout_s, retry=True)["tensors"]
        return (
            None
            if tensors is None
            else {t["name"]: TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in tensors}
        )

    def infer(
        self,
        request_id: str,
        prompts: list[list[int]],
        sampling: list[dict],
        expect_version: int | None,
        images: list[list[str]] | None = None,
    ) -> list[dict]:
        body = {
            "request_id": request_id,
            "prompts": prompts,
            "sampling": sampling,
            "expect_weight_version": expect_version,
        }
        if images is not None:  # absolute paths: the server reads them from the filesystem it shares with the learner
            body["images"] = images
        return self.request("POST", "/infer/", body, timeout_s=self.infer_timeout_s, retry=True)["outputs"]

    # ------------------------------------------------------------------ weight sync (never retried)
    def init_communicator(self, timeout_s: float | None = None) -> None:
        """Open this server's weight-sync group and join it as the last rank."""
        t = self.timeout_s if timeout_s is None else timeout_s
        world = self.world_size() + 1
        reply = self.request(
            "POST",
            "/init_communicator/",
            {"port": self.group_port, "world_size": world, "timeout_s": t},
            timeout_s=t,
            retry=False,
            error_cls=WeightSyncError,
        )
        if reply["backend"] == "nccl":
            import torch

            if not torch.cuda.is_available():
                raise WeightSyncError(f"{self.base_url} syncs over NCCL but this learner has no GPU", url=self.base_url)
        group = SyncGroup(self.host, self.group_port, world, world - 1, reply["backend"], t)
        try:
            group.open_store(is_master=False)
            group.join()
        except Exception as exc:
            raise WeightSyncError(
                f"joining the weight-sync group of {self.base_url} at {self.host}:{self.group_port} "
                f"({reply['backend']}) failed: {exc}",
                url=self.base_url,
            ) from None
        self.group = group

    def update_weights(self, version: int, specs: list[dict], last: bool) -> None:
        self.request(
            "POST",
            "/update_weights/",
            {"version": version, "tensors": specs, "last": last},
            timeout_s=self.timeout_s,
            retry=False,
            error_cls=WeightSyncError,
        )

    def reset_prefix_cache(self) -> int:
        return int(
            self.request(
                "POST", "/reset_prefix_cache/", timeout_s=self.timeout_s, retry=False, error_cls=WeightSyncError
            )["weight_version"]
        )

    def close(self) -> None:
        if self.group is not None:
            try:
                self.request("POST", "/close_communicator/", timeout_s=min(self.timeout_s, 30.0), retry=False)
            except RolloutServerError as exc:
                log.warning("closing the weight-sync group of %s: %s", self.base_url, exc)
            self.group.close()
            self.group = None
        self.session.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:300] if text else type(exc).__name__
