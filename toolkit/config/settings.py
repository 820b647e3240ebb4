"""Typed settings: the resolved profile's runtime knobs as frozen dataclasses, built once per ResolvedConfig.

The trainer, the backends, the rollout server and the launcher read `cfg.settings.<group>` (and `cfg.derived`)
and never re-derive a value or repeat a default: every default lives in the schema (schema.py), a `None`
stays `None` ("engine default" / "no cap"). Imports stdlib only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RepeatSettings:
    """`rollout_matching.repeat_terminate` when enabled; the rule itself is rollout/repeat.py `should_stop`."""

    min_new_tokens: int = 0
    max_consecutive_token_repeats: int = 0
    ngram_size: int = 0
    ngram_repeats: int = 0
    max_object_keys: int | None = None

    @classmethod
    def from_section(cls, rt: Mapping[str, Any]) -> RepeatSettings | None:
        """None when the guards are disabled."""
        if not rt["enabled"]:
            return None
        return cls(**{k: rt[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class DecodeSettings:
    """What every backend needs to decode (rollouts and rollout-aware eval)."""

    max_new_tokens: int
    decode_batch_size: int
    do_sample: bool
    temperature: float  # 1.0 when greedy
    top_p: float
    top_k: int
    repetition_penalty: float
    repeat: RepeatSettings | None  # None when repeat_terminate is disabled
    seed: int

    @property
    def max_object_keys(self) -> int | None:
        return self.repeat.max_object_keys if self.repeat else None


@dataclass(frozen=True)
class MatchSettings:
    """Hungarian matching with the mask-IoU gate (rollout/match.py)."""

    candidate_top_k: int
    maskiou_gate: float
    maskiou_resolution: int
    fp_cost: float
    fn_cost: float


@dataclass(frozen=True)
class PackingSettings:
    """Post-rollout packing of segments into sequences of `length` tokens (trainer/packing.py)."""

    enabled: bool
    length: int  # global_max_length
    buffer: int
    min_fill_ratio: float


@dataclass(frozen=True)
class ServerAddress:
    base_url: str
    group_port: int


@dataclass(frozen=True)
class ServerSettings:
    """Server mode: the rollout servers the learner calls."""

    timeout_s: float
    infer_timeout_s: float  # its null default already resolved to timeout_s
    overlap: bool
    servers: tuple[ServerAddress, ...]


@dataclass(frozen=True)
class SyncSettings:
    mode: str  # "full" | "adapter": `auto` already resolved
    fallback_to_full: bool
    bucket_size_mb: int


@dataclass(frozen=True)
class VllmSettings:
    """The vLLM engine, in the trainer (colocate) or in a rollout server."""

    mode: str  # "colocate" | "server"
    max_model_len: int | None
    tensor_parallel_size: int
    gpu_memory_utilization: float
    enable_lora: bool
    enable_prefix_caching: bool
    enforce_eager: bool
    max_num_seqs: int | None  # None: vLLM's default
    max_num_batched_tokens: int | None
    dtype: str
    kv_cache_gb: float | None
    max_images_per_prompt: int


@dataclass(frozen=True)
class MonitorSettings:
    """Qualitative rollout dumps in <output_dir>/monitor_dumps/."""

    enabled: bool
    every_steps: int
    max_samples: int
    max_text_chars: int


@dataclass(frozen=True)
class Settings:
    """Everything the runtime reads about rollouts, matching and packing, typed."""

    rollout_backend: str  # "hf" | "vllm"
    decode: DecodeSettings
    match: MatchSettings
    packing: PackingSettings
    vllm: VllmSettings
    server: ServerSettings
    sync: SyncSettings
    monitor: MonitorSettings
    object_field_order: str

    def to_dict(self) -> dict:
        return asdict(self)


SETTINGS_DOCS = {
    "rollout_backend": "rollout_matching.rollout_backend.",
    "decode": "max_new_tokens, decode_batch_size, do_sample (decode_mode sample or a temperature > 0), temperature "
    "(1.0 when greedy), top_p, top_k, repetition_penalty, repeat (repeat_terminate; null when disabled), "
    "seed (= training.seed).",
    "match": "candidate_top_k, maskiou_gate, maskiou_resolution, fp_cost, fn_cost.",
    "packing": "enabled (= training.packing), length (= global_max_length), buffer (= training.packing_buffer), "
    "min_fill_ratio (= training.packing_min_fill_ratio).",
    "vllm": "the engine knobs of rollout_matching.vllm (mode null already resolved to colocate; a null knob stays "
    "null: vLLM's default applies).",
    "server": "timeout_s, infer_timeout_s (null already resolved to timeout_s), overlap, servers (base_url, "
    "group_port).",
    "sync": "mode (auto already resolved), fallback_to_full, bucket_size_mb.",
    "monitor": "rollout_matching.monitor_dump.",
    "object_field_order": "template.object_field_order.",
}


def _fields(cls, section: Mapping[str, Any], **given) -> Any:
    names = [n for n in cls.__dataclass_fields__ if n not in given]
    return cls(**{n: section[n] for n in names}, **given)


def build_settings(cfg: Mapping[str, Any], sync_mode: str) -> Settings:
    """The typed view of a validated, normalized config dict (sync_mode: `Derived.vllm_sync_mode`)."""
    rm, training = cfg["rollout_matching"], cfg["training"]
    dec, vllm, srv = rm["decoding"], rm["vllm"], rm["vllm"]["server"]
    sample = rm["decode_mode"] == "sample" or dec["temperature"] > 0
    decode = DecodeSettings(
        max_new_tokens=rm["max_new_tokens"],
        decode_batch_size=rm["decode_batch_size"],
        do_sample=bool(sample),
        temperature=float(dec["temperature"]) if sample else 1.0,
        top_p=float(dec["top_p"]),
        top_k=int(dec["top_k"]),
        repetition_penalty=float(rm["repetition_penalty"]),
        repeat=RepeatSettings.from_section(rm["repeat_terminate"]),
        seed=training["seed"],
    )
    packing = PackingSettings(
        enabled=bool(training["packing"]),
        length=int(cfg["global_max_length"]),
        buffer=training["packing_buffer"],
        min_fill_ratio=training["packing_min_fill_ratio"],
    )
    servers = tuple(ServerAddress(s["base_url"], s["group_port"]) for s in srv["servers"])
    return Settings(
        rollout_backend=rm["rollout_backend"],
        decode=decode,
        match=_fields(MatchSettings, rm),
        packing=packing,
        vllm=_fields(VllmSettings, vllm),
        server=_fields(ServerSettings, srv, servers=servers),
        sync=_fields(SyncSettings, vllm["sync"], mode=sync_mode),
        monitor=_fields(MonitorSettings, rm["monitor_dump"]),
        object_field_order=cfg["template"]["object_field_order"],
    )
