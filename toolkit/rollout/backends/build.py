"""`build_backend`: the rollout backend a profile asks for, built one way for the trainer and `stage2 eval`.

Kinds: "hf" (HF `generate` on the caller's module), "colocate" (an in-process vLLM engine per rank),
"server" (`stage2 serve` servers: the run first waits for every server's /health/, saying what it waits
for and where). The profile's `rollout_matching.rollout_backend` and `vllm.mode` pick the kind unless
the caller names one. Backends are imported when built: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time

from toolkit.config.settings import ServerSettings

log = logging.getLogger(__name__)
WAIT_LOG_EVERY_S = 15.0


def backend_kind(cfg) -> str:
    """ "hf", "colocate" or "server", from the profile."""
    if cfg.settings.rollout_backend != "vllm":
        return "hf"
    return "server" if cfg.derived.server_mode else "colocate"


def build_backend(
    cfg,
    codec,
    *,
    kind: str | None = None,
    model_dir: str | None = None,
    module=None,
    pad_id: int | None = None,
    weights=None,
    device="cpu",
    rank: int = 0,
    world_size: int = 1,
    vision=None,
    generation_context=contextlib.nullcontext,
):
    """The rollout backend of `kind` (default: the profile's, see `backend_kind`).

    hf: decodes with `module` (`pad_id`, `device`, `vision`; `generation_context` lifts ZeRO-3's hooks).
    colocate: an engine on `model_dir` (default `model.model`). Both vLLM kinds take the learner's
    gathered weights from `weights` (None: the engine keeps the served checkpoint) and check their
    names at start-up — a collective under ZeRO-3, so every rank calls this.
    """
    kind = kind or backend_kind(cfg)
    s = cfg.settings
    common = dict(eos_id=codec.im_end_id, object_key_ids=codec.object_key_token_ids())
    if kind == "server":
        from toolkit.rollout.backends.vllm_server import VLLMServerBackend

        wait_for_servers(s.server, rank)
        return VLLMServerBackend.from_settings(
            s.server,
            s.decode,
            bucket_size_mb=s.sync.bucket_size_mb,
            rank=rank,
            world_size=world_size,
            weights=weights,
            device=str(device),
            **common,
        )
    if kind == "colocate":
        from toolkit.rollout.backends.vllm_colocate import VLLMColocateBackend

        return VLLMColocateBackend.create(
            model=model_dir or cfg.model.model,
            vllm=s.vllm,
            settings=s.decode,
            model_dtype=cfg.model.torch_dtype,
            weights=weights,
            **common,
        )
    if kind != "hf":
        raise ValueError(f"unknown rollout backend kind {kind!r} (hf, colocate or server)")
    from toolkit.rollout.backends.hf import HFBackend

    # Under ZeRO-3 the trainer's context gathers all parameters and lifts the hooks, so ranks may decode different
    # lengths without synced_gpus; every rank still makes the same number of calls.
    return HFBackend(
        module, s.decode, pad_id=pad_id, device=device, vision=vision, generation_context=generation_context, **common
    )


def announce_servers(server: ServerSettings) -> None:
    """Server mode, said at start-up (before the model loads): where rollouts come from, the wait to come,
    and what to do when no server is running."""
    log.info(
        "vLLM server mode: rollouts come from %s; once the model is loaded the run waits up to %g s for their "
        "/health/ (rollout_matching.vllm.server.timeout_s). No server yet? `stage2-launch -p PROFILE "
        "--server-gpus …` starts one, or run `stage2 serve -p PROFILE --gpus …` first; in-process vLLM: "
        "--set rollout_matching.vllm.mode=colocate",
        ", ".join(s.base_url for s in server.servers),
        server.timeout_s,
    )


def wait_for_servers(server: ServerSettings, rank: int) -> None:
    """Server mode: say at once what the run waits for (rank 0), show the wait, fail with one message."""
    from toolkit.rollout.client import ServerClient, ServerUnavailableError

    total, every = float(server.timeout_s), WAIT_LOG_EVERY_S
    urls = [s.base_url for s in server.servers]
    if rank == 0:
        log.info(
            "waiting up to %g s for %s (rollout_matching.vllm.server.timeout_s)",
            total,
            ", ".join(f"{url}/health/" for url in urls),
        )
    t0 = time.monotonic()
    for url in urls:
        client = ServerClient(url, 0, timeout_s=total, infer_timeout_s=total)
        while True:
            left = total - (time.monotonic() - t0)
            try:
                client.wait_healthy(total_timeout_s=max(1.0, min(every, left)))
                break
            except ServerUnavailableError as exc:
                if left <= every:  # the message names the whole wait, not the last poll
                    raise ServerUnavailableError(
                        re.sub(r"after [0-9.]+ s", f"after {total:g} s", str(exc), count=1), url=exc.url
                    ) from None
                if rank == 0:
                    log.info("still waiting for %s/health/ (%.0f of %g s)", url, time.monotonic() - t0, total)
