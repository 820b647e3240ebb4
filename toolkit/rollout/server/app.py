"""HTTP surface of the rollout server: `create_app(engine)` → FastAPI app (docs/VLLM.md, Protocol).

Importable without vLLM or torch: the engine is passed in (`engine.DPEngine` in production; tests may
pass any object with the same methods). Every handler is `async` and runs the engine's blocking call
in a thread under a timeout (504 when it expires). Engine errors map to statuses by type
(errors.py): 400 bad request, 409 stale weights / port taken, 503 worker gone, 504 timeout. /infer/
is idempotent per `request_id`: a retried id joins the in-flight call or gets the cached answer.
A malformed body is a 422 whose `detail` lists each bad field (`loc`, `msg`; never the raw input,
which may be NaN and cannot be written as JSON). Weight-changing endpoints require
`Authorization: Bearer <token>` when the app has a token; with `token_for_all` (the CLI sets it when
the server binds a non-loopback address, and insists on a token there) every endpoint but /health/
does, and the interactive docs are off.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from toolkit.rollout import errors
from toolkit.rollout.server.models import (
    Health,
    InferRequest,
    InferResponse,
    Info,
    InitCommunicatorRequest,
    InitCommunicatorResponse,
    Ok,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
    WeightsSchema,
    WeightVersion,
    WorldSize,
)

log = logging.getLogger(__name__)
CACHED_RESULTS = 256


def create_app(
    engine,
    *,
    token: str | None = None,
    timeout_s: float = 240.0,
    infer_timeout_s: float = 240.0,
    token_for_all: bool = False,
) -> FastAPI:
    """The rollout server app over `engine` (see module docstring for the contract)."""
    if token_for_all and not token:
        raise ValueError("token_for_all needs a token")
    docs = {} if not token_for_all else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="stage2 rollout server", version="1", **docs)

    async def run(fn: Callable[..., Any], *args, timeout: float = timeout_s, **kwargs):
        """The engine's blocking call in a worker thread, under a timeout (the event loop never blocks)."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), timeout)
        except TimeoutError:
            raise errors.Timeout(f"{getattr(fn, '__name__', 'call')} did not finish within {timeout:g} s") from None

    @app.exception_handler(errors.EngineError)
    async def engine_error(_request, exc: errors.EngineError):
        return JSONResponse(status_code=exc.status, content={"detail": str(exc), "error": type(exc).__name__})

    @app.exception_handler(RequestValidationError)
    async def bad_body(_request, exc: RequestValidationError):
        return JSONResponse(
            status_code=422, content={"detail": validation_details(exc.errors()), "error": "BadRequest"}
        )

    guard = _token_guard(token, "every endpoint but /health/" if token_for_all else "weight-changing endpoints")
    _read_routes(app, engine, [Depends(guard)] if token_for_all else [])
    _infer_route(app, engine, run, infer_timeout_s, [Depends(guard)] if token_for_all else [])
    _weight_routes(app, engine, run, guard, timeout_s)
    return app


def validation_details(errs) -> list[dict]:
    """pydantic's errors without `input`/`ctx` (they may hold NaN or huge values): field path and message,
    e.g. `[{"loc": ["body", "sampling", 0, "temperature"], "msg": "Input should be a finite number"}]`."""
    return [
        {
            "loc": [part if isinstance(part, (int, str)) else str(part) for part in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in errs
    ]


def _token_guard(token: str | None, scope: str):
    def require_token(authorization: str | None = Header(default=None)) -> None:
        if token is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                status_code=401,
                detail=f"{scope} need 'Authorization: Bearer <token>' (the server's STAGE2_SERVE_TOKEN)",
            )

    return require_token


def _read_routes(app: FastAPI, engine, guarded: list) -> None:
    @app.get("/health/", response_model=Health)
    async def health():
        """Liveness of every DP worker. 200 `{"status": "ok", "detail": ""}`; 503
        `{"status": "unhealthy", "detail": "dp rank 1 exited with code -9"}` (or a generate that overran its
        deadline: the engine may be wedged). Never needs the token."""
        ok, detail = engine.health()
        body = Health(status="ok" if ok else "unhealthy", detail=detail)
        return body if ok else JSONResponse(status_code=503, content=body.model_dump())

    @app.get("/get_world_size/", response_model=WorldSize, dependencies=guarded)
    async def get_world_size():
        """Rollout world size DP × TP, e.g. `{"world_size": 2}` (the learner's chunk arithmetic reads it)."""
        return WorldSize(world_size=engine.world_size())

    @app.get("/info/", response_model=Info, dependencies=guarded)
    async def info():
        """What is served, e.g. `{"model": "/ckpt/stage1", "max_model_len": 1024, "dtype": "float32",
        "weight_version": 3, "device": "cpu", "data_parallel_size": 2, "tensor_parallel_size": 1}`."""
        return Info(**engine.info())

    @app.get("/weights_schema/", response_model=WeightsSchema, dependencies=guarded)
    async def weights_schema():
        """Tensors of the served checkpoint (the names weight updates must use), e.g.
        `{"tensors": [{"name": "lm_head.weight", "dtype": "float32", "shape": [1319, 128]}, ...]}`."""
        return WeightsSchema(tensors=engine.weights_schema())


def _infer_route(app: FastAPI, engine, run, infer_timeout_s: float, guarded: list) -> None:
    inflight: dict[str, asyncio.Future] = {}
    done: collections.OrderedDict[str, list] = collections.OrderedDict()

    @app.post("/infer/", response_model=InferResponse, dependencies=guarded)
    async def infer(req: InferRequest):
        """Decode token-id prompts. Request:
        `{"request_id": "run1-r0-s3-o0-srv0", "prompts": [[151644, 872, 198]], "sampling": [{"max_tokens": 256,
        "temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "stop_token_ids": [151645],
        "seed": null}], "expect_weight_version": 3}`. Response: `{"request_id": "run1-r0-s3-o0-srv0", "outputs":
        [{"prompt_ids": [151644, 872, 198], "completion_ids": [90, 151645], "text": "", "finish_reason": "stop",
        "weight_version": 3}]}`. 409 when `expect_weight_version` differs from the engine's version.
        Image prompts (VLM) add `"images": [["/abs/img0.png"], …]`, one list per prompt, read only under the
        server's image roots (a path that is not a readable file there is a 400 naming it); `prompt_ids` is
        then the engine's expanded prompt. Limits of every field: docs/VLLM.md "Request limits"."""
        if req.request_id in done:
            return InferResponse(request_id=req.request_id, outputs=done[req.request_id])
        if req.request_id in inflight:  # a client retry while the first call still runs: share its result
            outputs = await asyncio.shield(inflight[req.request_id])
            return InferResponse(request_id=req.request_id, outputs=outputs)
        fut = asyncio.get_running_loop().create_future()
        inflight[req.request_id] = fut
        try:
            extra = {} if req.images is None else {"images": req.images}  # text requests: the engine call is unchanged
            outputs = await run(
                engine.infer,
                req.prompts,
                [s.model_dump() for s in req.sampling],
                req.expect_weight_version,
                infer_timeout_s,
                timeout=infer_timeout_s + 5,
                **extra,
            )
            fut.set_result(outputs)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: joiners re-raise it, nobody else needs to
            raise
        finally:
            inflight.pop(req.request_id, None)
        done[req.request_id] = outputs
        while len(done) > CACHED_RESULTS:
            done.popitem(last=False)
        return InferResponse(request_id=req.request_id, outputs=outputs)


def _weight_routes(app: FastAPI, engine, run, require_token, timeout_s: float) -> None:
    guarded = [Depends(require_token)]

    @app.post("/init_communicator/", response_model=InitCommunicatorResponse, dependencies=guarded)
    async def init_communicator(req: InitCommunicatorRequest):
        """Open the weight-sync group on `port` (learner = last rank). Request: `{"port": 51216,
        "world_size": 3, "backend": null, "timeout_s": 240}`. Response: `{"backend": "gloo", "world_size": 3,
        "learner_rank": 2, "port": 51216}`; 409 when the port is taken. The learner joins right after."""
        return InitCommunicatorResponse(
            **await run(engine.init_communicator, req.port, req.world_size, req.backend, req.timeout_s)
        )

    @app.post("/update_weights/", response_model=UpdateWeightsResponse, dependencies=guarded)
    async def update_weights(req: UpdateWeightsRequest):
        """Announce one bucket; the learner broadcasts its bytes right after this returns. Request:
        `{"version": 4, "tensors": [{"name": "model.norm.weight", "dtype": "float32", "shape": [128]}],
        "last": true}`. Response: `{"accepted": true, "version": 4, "nbytes": 512}`. `last` commits the
        version once the bucket is loaded. Never retried by the client (a retry would expect a 2nd broadcast)."""
        return UpdateWeightsResponse(
            **await run(engine.update_weights, req.version, [t.model_dump() for t in req.tensors], req.last)
        )

    @app.post("/reset_prefix_cache/", response_model=WeightVersion, dependencies=guarded)
    async def reset_prefix_cache():
        """Reset the prefix cache after every pending bucket is loaded; returns the version all ranks hold,
        e.g. `{"weight_version": 4}` (the learner's handshake). A failed bucket surfaces here as an error."""
        return WeightVersion(weight_version=await run(engine.reset_prefix_cache, timeout_s))

    @app.post("/close_communicator/", response_model=Ok, dependencies=guarded)
    async def close_communicator():
        """Tear down the weight-sync group (the learner calls it once at exit). Response: `{"ok": true}`."""
        await run(engine.close_communicator, timeout_s)
        return Ok()
