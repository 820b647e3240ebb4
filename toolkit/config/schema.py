"""The profile vocabulary: every section and key the trainer reads, with defaults and descriptions.

This module and toolkit/config/schema_rollout.py (the rollout_matching section) are the single place where
keys, types, defaults, constraints and descriptions live; docs/CONFIG_REFERENCE.md is generated from them
(`python -m toolkit.config.reference`). Imports no heavy module.
"""

from __future__ import annotations

from toolkit.config.atoms import (
    NONNEG_FLOAT,
    POS_FLOAT,
    POS_INT,
    UNIT_FLOAT,
    Bool,
    Const,
    Either,
    Enum,
    Float,
    FreeMapping,
    Int,
    ListOf,
    Nullable,
    OneOfFiles,
    Str,
)
from toolkit.config.dsconfig import ds_config_names
from toolkit.config.schema_rollout import ROLLOUT_MATCHING
from toolkit.config.spec import Key, Section, build_schema, key_index

FIELD_ORDERS = ("desc_first", "geometry_first")  # = toolkit.data.render.FIELD_ORDERS (checked by a test)
OBJECT_ORDERINGS = ("sorted", "given")  # = toolkit.data.render.OBJECT_ORDERINGS

MODEL = Section(
    "The policy model (the Stage-1 checkpoint Stage-2 starts from).",
    {
        "model": Key(Str(), "Local checkpoint directory or hub id; relative paths resolve against the project root."),
        "torch_dtype": Key(Enum("float32", "bfloat16"), "Parameter/compute dtype of the learner.", "float32"),
        "attn_impl": Key(
            Enum("sdpa_packed", "sdpa", "eager"),
            "Attention implementation passed to the model. sdpa_packed (default): SDPA run segment by segment over a "
            "packed row, so a pack costs the sum of its segments' squared lengths instead of its length squared; "
            "otherwise transformers' sdpa (docs/PERFORMANCE.md). sdpa, eager: transformers' own.",
            "sdpa_packed",
        ),
    },
    required=True,
)

TUNER = Section(
    "Which parameters train.",
    {
        "train_type": Key(
            Enum("full", "lora", "dora"),
            "Full fine-tuning, LoRA adapters, or DoRA (weight-decomposed LoRA, peft use_dora); adapters go "
            "on the language model, the vision tower and aligner train in full at vit_lr / aligner_lr.",
            "full",
        ),
        "lora_rank": Key(POS_INT, "LoRA/DoRA rank (train_type: lora | dora).", 16),
        "lora_alpha": Key(POS_INT, "LoRA/DoRA alpha (train_type: lora | dora).", 32),
        "lora_dropout": Key(Float(lo=0.0, hi=1.0, hi_open=True), "LoRA/DoRA dropout (train_type: lora | dora).", 0.05),
        "target_modules": Key(
            Either(Const("all-linear"), ListOf(Str())),
            'Modules that get adapters: "all-linear" or a list of module names.',
            "all-linear",
        ),
        "freeze_vit": Key(Bool(), "Freeze the vision tower.", False),
        "freeze_aligner": Key(Bool(), "Freeze the vision-language aligner.", False),
    },
)

TEMPLATE = Section(
    "Prompt and answer rendering (toolkit.data.render).",
    {
        "object_field_order": Key(Enum(*FIELD_ORDERS), "Order of desc and bbox_2d inside each object.", "desc_first"),
        "object_ordering": Key(
            Enum(*OBJECT_ORDERINGS), "Objects sorted top-to-bottom/left-to-right, or as given.", "sorted"
        ),
        "system_prompt": Key(
            Nullable(Str(), "built-in prompt"), "System prompt text; null uses the built-in one.", None
        ),
        "max_pixels": Key(Nullable(POS_INT), "Image resize cap in pixels for VLM inputs; null = no resize.", None),
    },
)

DATA = Section(
    "Training and validation records.",
    {
        "train_jsonl": Key(Str(), "Training JSONL; relative paths resolve against the project root."),
        "val_jsonl": Key(Nullable(Str()), "Validation JSONL (needed when training.eval_strategy is steps).", None),
        "image_root": Key(
            Nullable(Str(), "each records file's own directory"),
            "Root for relative image paths in records (docs/DATA.md).",
            None,
        ),
        "bbox_format": Key(
            Enum("norm1000", "pixel"),
            "Box units in the records: integer bins 0..999, or pixels of the "
            "record's width x height (converted to bins on load; docs/DATA.md).",
            "norm1000",
        ),
        "poly_policy": Key(
            Enum("error", "drop"),
            "Poly objects in the records (Stage-2 trains boxes): error names each "
            "file:line; drop skips them, counted per file in the log and data/*_poly_dropped metrics.",
            "error",
        ),
        "train_sample_limit": Key(Nullable(POS_INT), "Use only the first N training records.", None),
        "val_sample_limit": Key(Nullable(POS_INT), "Use only the first N validation records.", None),
        "shuffle": Key(Bool(), "Shuffle training records each epoch (seeded).", True),
    },
    required=True,
)

TRAINING = Section(
    "Optimization, evaluation, checkpointing and logging.",
    {
        "run_name": Key(Str(), "Run identity used in logs and metrics."),
        "output_dir": Key(
            Str(),
            "The run's folder: resolved_config.yaml, metrics.jsonl, checkpoints/, tb/, logs/ "
            "(toolkit/runlayout.py); relative to the project root. One run per folder.",
        ),
        "logging_dir": Key(
            Nullable(Str(), "<output_dir>/tb"),
            "TensorBoard directory; relative to the project root; null follows output_dir.",
            None,
        ),
        "seed": Key(Int(), "Global seed (data order, init, sampling).", 17),
        "learning_rate": Key(POS_FLOAT, "Learning rate of the language model parameters."),
        "vit_lr": Key(Nullable(NONNEG_FLOAT, "= learning_rate"), "Learning rate of the vision tower.", None),
        "aligner_lr": Key(Nullable(NONNEG_FLOAT, "= learning_rate"), "Learning rate of the aligner.", None),
        "weight_decay": Key(NONNEG_FLOAT, "AdamW weight decay.", 0.0),
        "adam_beta1": Key(Float(lo=0.0, hi=1.0, hi_open=True), "AdamW beta1.", 0.9),
        "adam_beta2": Key(Float(lo=0.0, hi=1.0, hi_open=True), "AdamW beta2.", 0.999),
        "adam_epsilon": Key(POS_FLOAT, "AdamW epsilon.", 1e-8),
        "lr_scheduler_type": Key(
            Enum("constant", "linear", "cosine"), "Learning-rate schedule after warmup.", "cosine"
        ),
        "warmup_ratio": Key(Float(lo=0.0, hi=1.0, hi_open=True), "Fraction of optimizer steps spent warming up.", 0.0),
        "max_grad_norm": Key(
            Nullable(POS_FLOAT, "no clipping"), "Gradient clipping norm (the trainer injects it into DeepSpeed).", 1.0
        ),
        "num_train_epochs": Key(POS_FLOAT, "Epochs to train when max_steps is -1.", 1.0),
        "max_steps": Key(Int(lo=1, also=(-1,)), "Optimizer steps to run; -1 derives them from num_train_epochs.", -1),
        "per_device_train_batch_size": Key(POS_INT, "Raw samples per rank per micro-step (P).", 1),
        "per_device_eval_batch_size": Key(
            POS_INT, "Ignored for rollout-aware eval: resolved to rollout_matching.decode_batch_size.", 1
        ),
        "gradient_accumulation_steps": Key(
            Nullable(POS_INT, "derived"),
            "Derived = effective_batch_size / (P × W); may be given only when equal.",
            None,
        ),
        "effective_batch_size": Key(
            POS_INT, "Raw samples (= Channel-B rollouts) per optimizer step, over all ranks (E)."
        ),
        "logging_steps": Key(POS_INT, "Log metrics every N optimizer steps.", 1),
        "eval_strategy": Key(Enum("no", "steps"), "Run rollout evaluation every eval_steps, or never.", "steps"),
        "eval_steps": Key(POS_INT, "Optimizer steps between evaluations.", 500),
        "save_strategy": Key(Enum("no", "steps"), "Save checkpoints every save_steps, or never.", "steps"),
        "save_steps": Key(POS_INT, "Optimizer steps between checkpoints.", 500),
        "save_total_limit": Key(Nullable(POS_INT, "keep all"), "Keep at most N checkpoints.", None),
        "metric_for_best_model": Key(
            Str(),
            "Metric that ranks checkpoints (group/name); with a rollout eval "
            "configured, its eval_ value on checkpoints taken at an eval step.",
            "rollout/f1",
        ),
        "greater_is_better": Key(Bool(), "Whether a larger metric_for_best_model is better.", True),
        "packing": Key(Bool(), "Pack teacher-forced segments into global_max_length sequences.", True),
        "packing_buffer": Key(
            POS_INT,
            "Most segments one rank may hold for post-rollout packing in one step "
            "(effective_batch_size / world size must fit).",
            256,
        ),
        "packing_min_fill_ratio": Key(
            Float(lo=0.0, hi=1.0, lo_open=True),
            "Packs filled below this fraction of global_max_length are counted "
            "(packing/underfilled_packs); server mode starts a pack once this full.",
            0.5,
        ),
        "report_to": Key(
            ListOf(Enum("tensorboard", "jsonl", "wandb")),
            "Metric sinks; wandb needs the `.[wandb]` extra (docs/STAGE2_RUNBOOK.md).",
            ["tensorboard", "jsonl"],
        ),
        "wandb_project": Key(
            Str(), "Weights & Biases project (report_to: wandb); the run is named run_name.", "stage2"
        ),
        "gradient_checkpointing": Key(Bool(), "Recompute activations in backward to save memory.", False),
        "collective_timeout_s": Key(
            POS_FLOAT,
            "Longest wait of a learner collective for its peers (seconds): a lost or "
            "hung rank fails the others after this instead of hanging. Must exceed the "
            "longest gap between collectives (a slow rollout round, a checkpoint).",
            1800.0,
        ),
    },
    required=True,
)

DEEPSPEED = Section(
    "The DeepSpeed engine config, by name from ds_configs/.",
    {
        "enabled": Key(Bool(), "Use the DeepSpeed engine."),
        "config": Key(
            Nullable(OneOfFiles(ds_config_names, "DeepSpeed config")),
            "Name of ds_configs/<name>.json without .json (e.g. zero2); required when enabled.",
            None,
        ),
    },
    required=True,
)

SCHEDULE = Section(
    "Channel schedule.",
    {
        "b_ratio": Key(UNIT_FLOAT, "Fraction of optimizer steps that are Channel-B (0 = A only, 1 = B only)."),
    },
    required=True,
)

CHANNEL_B = Section(
    "Channel-B (rollout) loss knobs.",
    {
        "drop_invalid_struct_ce_multiplier": Key(
            Float(lo=1.0, hi=4.0), "CE multiplier on closure tokens of rollouts with dropped invalid objects.", 1.0
        ),
    },
)

STAGE2_AB = Section(
    "Stage-2 AB: schedule and loss weights.",
    {
        "schedule": SCHEDULE,
        "n_softctx_iter": Key(POS_INT, "Channel-A soft self-context passes over coordinate slots.", 2),
        "softctx_grad_mode": Key(Enum("unroll", "em_detach"), "Gradient flow through soft-context passes.", "unroll"),
        "softctx_temperature": Key(POS_FLOAT, "Temperature of the expected-coordinate embedding.", 1.0),
        "desc_ce_weight": Key(NONNEG_FLOAT, "CE weight on desc value tokens.", 1.0),
        "bbox_smoothl1_weight": Key(NONNEG_FLOAT, "Smooth-L1 weight on decoded boxes.", 1.0),
        "bbox_ciou_weight": Key(NONNEG_FLOAT, "CIoU loss weight on decoded boxes.", 1.0),
        "coord_ce_weight": Key(NONNEG_FLOAT, "CE weight on coordinate tokens.", 0.0),
        "coord_el1_weight": Key(NONNEG_FLOAT, "Expected-L1 weight on the coordinate distribution.", 0.0),
        "coord_ehuber_weight": Key(NONNEG_FLOAT, "Expected-Huber weight on the coordinate distribution.", 0.0),
        "coord_huber_delta": Key(POS_FLOAT, "Huber delta (normalized coordinates).", 0.001),
        "coord_entropy_weight": Key(
            Float(), "Weight of the coordinate-distribution entropy term (may be negative).", 0.0
        ),
        "coord_gate_weight": Key(
            NONNEG_FLOAT, "Gate that keeps probability mass on coordinate tokens at coordinate slots.", 1.0
        ),
        "loss_normalization": Key(
            Enum("per_sample", "per_pack_token_mean"),
            "per_sample: each sample's terms are means over its own tokens/slots, samples weigh equally "
            "(independent of packing, rounds, ranks); per_pack_token_mean: the predecessor's means over "
            "each pack, for reproducing old runs (docs/METRICS_LOSSES.md).",
            "per_sample",
        ),
        "channel_b": CHANNEL_B,
    },
    required=True,
)


CUSTOM = Section(
    "Residual knobs.",
    {
        "extra": Key(FreeMapping(), "Free-form mapping; the only place for unvalidated knobs.", {}),
    },
)

ROOT = Section(
    "A Stage-2 profile.",
    {
        "model": MODEL,
        "tuner": TUNER,
        "template": TEMPLATE,
        "data": DATA,
        "training": TRAINING,
        "deepspeed": DEEPSPEED,
        "global_max_length": Key(POS_INT, "Post-rollout packing length and teacher-forced max length (tokens)."),
        "stage2_ab": STAGE2_AB,
        "rollout_matching": ROLLOUT_MATCHING,
        "custom": CUSTOM,
    },
)

# Keys whose relative string values are paths (resolved against the project root; see reference).
PATH_KEYS = (
    ("data", "train_jsonl"),
    ("data", "val_jsonl"),
    ("data", "image_root"),
    ("training", "output_dir"),
    ("training", "logging_dir"),
)
MODEL_PATH_KEY = ("model", "model")

FULL_SCHEMA = build_schema(ROOT)
KEY_INDEX = key_index(ROOT)  # key name → dotted paths, for "did you mean <other section>"
PARTIAL_SCHEMA = build_schema(ROOT, partial=True)
