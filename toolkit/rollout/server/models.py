"""Request and response bodies of the rollout server (pydantic v2). Imports nothing heavy.

Token ids in, token ids out: prompts are lists of ids (the learner renders and tokenizes), and every
completion comes back as ids with its finish reason and the weight version that produced it. Image
prompts (vision-language models) add file paths; `prompt_ids` is then the engine's expanded prompt.
Unknown fields are rejected, so a misspelled knob is a 422, not a silent default. Every number is
bounded here, before any engine sees it (docs/VLLM.md "Request limits"): integers within the ranges
below, floats finite; what depends on the served model (token ids < vocab size, prompt + max_tokens
within max_model_len) is checked by the engine (engine.check_request).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

INT32_MAX = 2**31 - 1
INT63_MAX = 2**63 - 1
MAX_PROMPTS = 4096  # prompts per /infer/ call (a learner sends decode_batch_size × server world per round)
MAX_JOIN_TIMEOUT_S = 3600.0

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]  # < vocab size is checked by the engine
Prompt = Annotated[list[TokenId], Field(min_length=1)]
ImagePath = Annotated[str, Field(min_length=1, max_length=4096)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN/Infinity are 422s, never reach vLLM


class Sampling(_Strict):
    """One request's decoding knobs (vLLM `SamplingParams`); temperature 0 is greedy."""

    max_tokens: int = Field(gt=0, le=INT32_MAX)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # vLLM's own limit
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, le=INT32_MAX)
    repetition_penalty: float = Field(1.0, gt=0.0, le=1000.0)
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=1024)
    seed: int | None = Field(None, ge=0, le=INT63_MAX)


class InferRequest(_Strict):
    request_id: str = Field(min_length=1, max_length=200)
    prompts: list[Prompt] = Field(min_length=1, max_length=MAX_PROMPTS)
    sampling: list[Sampling] = Field(min_length=1, max_length=MAX_PROMPTS, description="one per prompt, or one for all")
    expect_weight_version: int | None = Field(
        None, ge=-INT63_MAX, le=INT63_MAX, description="409 when the engine holds another version"
    )
    images: list[list[ImagePath]] | None = Field(
        None,
        description="per prompt, the absolute paths of its images in placeholder order ([] for a text prompt); "
        "the server reads them from its own filesystem (shared with the learner)",
    )


class InferOutput(_Strict):
    prompt_ids: list[int]  # the engine's prompt (image pads as vLLM expanded them)
    completion_ids: list[int]
    text: str = ""
    finish_reason: str
    weight_version: int


class InferResponse(_Strict):
    request_id: str
    outputs: list[InferOutput]


class Health(_Strict):
    status: Literal["ok", "unhealthy"]
    detail: str = ""


class WorldSize(_Strict):
    world_size: int


class Info(_Strict):
    model: str
    max_model_len: int
    dtype: str
    weight_version: int
    device: str
    data_parallel_size: int
    tensor_parallel_size: int


class TensorMeta(_Strict):
    name: str = Field(min_length=1, max_length=1000)
    dtype: str = Field(max_length=32)
    shape: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] = Field(max_length=8)


class WeightsSchema(_Strict):
    tensors: list[TensorMeta] | None = Field(description="null when the served model is not a local safetensors dir")


class InitCommunicatorRequest(_Strict):
    port: int = Field(ge=1024, le=65535)
    world_size: int = Field(ge=2, le=65536, description="server world size + 1 (the learner is the last rank)")
    backend: Literal["gloo", "nccl"] | None = None
    timeout_s: float = Field(240.0, gt=0, le=MAX_JOIN_TIMEOUT_S)


class InitCommunicatorResponse(_Strict):
    backend: str
    world_size: int
    learner_rank: int
    port: int


class UpdateWeightsRequest(_Strict):
    version: int = Field(ge=0, le=INT63_MAX)
    tensors: list[TensorMeta] = Field(min_length=1, max_length=100_000)
    last: bool = False


class UpdateWeightsResponse(_Strict):
    accepted: bool
    version: int
    nbytes: int


class WeightVersion(_Strict):
    weight_version: int


class Ok(_Strict):
    ok: bool = True
