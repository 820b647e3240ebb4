"""The legacy-key table (dotted path → migration text) and the pre-schema check that applies it.

Runs before the schema so the tailored migration message always wins over "unknown key". Legacy
keys fail: there is no alias fallback and no dual read. Reported keys are removed from the data so
the schema pass does not report them a second time. Imports stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.config.errors import Issue
from toolkit.config.yamlio import Document, render_path

RELOCATION_SUFFIX = ".*"


@dataclass(frozen=True)
class Legacy:
    """What happened to a key (`message`) and the replacement the user should write (`fix`)."""

    message: str
    fix: str


def _moved(new: str, note: str = "") -> Legacy:
    return Legacy(f"moved to {new}{'; ' + note if note else ''}", f"move the value to {new}")


def _removed(why: str, instead: str) -> Legacy:
    return Legacy(f"removed: {why}", instead)


_CB = "stage2_ab.channel_b."
_RM = "rollout_matching."

LEGACY: dict[str, Legacy] = {
    "extra": Legacy(
        "a top-level `extra` section is not supported; residual knobs live in custom.extra",
        "move its keys under custom.extra",
    ),
    "inherit": Legacy("`inherit` was renamed to `extends`", "write `extends: ../base.yaml` (one parent)"),
    "prompts": _removed("YAML prompt overrides are disabled", "set template.system_prompt (one string) instead"),
    "debug": _removed(
        "the debug section is gone", "use data.train_sample_limit / data.val_sample_limit or a smoke profile"
    ),
    "quantization": _removed(
        "quantized training is not supported", "delete the section (tuner.train_type: lora for low memory)"
    ),
    "rlhf": _removed("RLHF/GKD variants are not part of Stage-2", "delete the section"),
    "custom.extra.rollout_matching" + RELOCATION_SUFFIX: Legacy(
        "rollout settings moved from custom.extra.rollout_matching to top-level rollout_matching (same sub-keys)",
        "move the value to rollout_matching.<same sub-key>",
    ),
    "custom.train_jsonl": _moved("data.train_jsonl"),
    "custom.val_jsonl": _moved("data.val_jsonl"),
    "custom.train_sample_limit": _moved("data.train_sample_limit"),
    "custom.val_sample_limit": _moved("data.val_sample_limit"),
    "custom.object_field_order": _moved("template.object_field_order"),
    "custom.object_ordering": _moved("template.object_ordering", "values are sorted|given"),
    "custom.trainer_variant": _removed("every profile is a Stage-2 AB profile", "delete the key"),
    "custom.coord_soft_ce_w1": _removed(
        "coordinate losses are configured in stage2_ab",
        "use stage2_ab.coord_gate_weight and the stage2_ab.coord_* weights",
    ),
    "stage2_ab.schedule.pattern": Legacy(
        "schedule patterns are not supported; the schedule is a ratio",
        "set stage2_ab.schedule.b_ratio (float in [0,1]; 0 = A only, 1 = B only, 0.05 ≈ 5% B)",
    ),
    _CB + "mode": _removed("Channel-B is always step-budgeted", "delete the key"),
    _CB + "async": _removed("the async actor-learner is unsupported", "delete the key"),
    _CB + "rollouts_per_step": _removed(
        "raw rollouts per optimizer step = training.effective_batch_size", "set training.effective_batch_size"
    ),
    _CB + "enable_pipeline": _removed("pipeline overlap is automatic in vLLM server mode", "delete the key"),
    _CB + "rollout_decode_batch_size": _removed(
        "one decode knob serves every backend", "set rollout_matching.decode_batch_size"
    ),
    _CB + "reordered_gt_sft": _removed("Channel-B is unified rollout-prefix + FN-append", "delete the key"),
    _CB + "desc_ce_weight_matched": _removed(
        "matched-object desc CE is always off in Channel-B",
        "delete the key (stage2_ab.desc_ce_weight weights desc CE elsewhere)",
    ),
    _CB + "semantic_desc_gate": _removed("training-time semantic gating is unsupported", "delete the key"),
    _CB + "stop_neutral": _removed("closure tokens are supervised in one pass", "delete the key"),
    _RM + "rollout_generate_batch_size": _removed(
        "one decode knob serves every backend", "set rollout_matching.decode_batch_size"
    ),
    _RM + "rollout_infer_batch_size": _removed(
        "one decode knob serves every backend", "set rollout_matching.decode_batch_size"
    ),
    _RM + "vllm.infer_batch_size": _removed(
        "one decode knob serves every backend", "set rollout_matching.decode_batch_size"
    ),
    _RM + "post_rollout_pack_scope": _removed(
        "micro-scope post-rollout packing is the only mode", "delete the key (packing knobs are training.packing_*)"
    ),
    _RM + "rollout_buffer": _removed("rollouts are never reused across steps", "delete the section"),
    _RM + "offload": _removed(
        "offloading the colocated engine is incompatible with DeepSpeed",
        "delete the section (use deepspeed.config: zero3_offload for memory)",
    ),
    _RM + "temperature": _moved("rollout_matching.decoding.temperature"),
    _RM + "top_p": _moved("rollout_matching.decoding.top_p"),
    _RM + "top_k": _moved("rollout_matching.decoding.top_k"),
    _RM + "vllm.server.base_url": Legacy(
        "the single-server form was replaced by a list of servers",
        "write rollout_matching.vllm.server.servers: [{base_url: ..., group_port: ...}]",
    ),
    _RM + "vllm.server.group_port": Legacy(
        "the single-server form was replaced by a list of servers",
        "write rollout_matching.vllm.server.servers: [{base_url: ..., group_port: ...}]",
    ),
    "training.dataloader_drop_last": _removed(
        "Stage-2 never runs a short step: an epoch's trailing window of fewer than effective_batch_size "
        "raw samples is always dropped",
        "delete the key",
    ),
    "training.packing_drop_last": _removed(
        "every segment of a step is trained; no pack is ever dropped", "delete the key"
    ),
    "training.packing_length": _removed("the packing length is the global token budget", "set global_max_length"),
    "stage2_ab.bbox_l1_weight": _moved("stage2_ab.bbox_smoothl1_weight", "the L1 term is now smooth-L1"),
    "stage2_ab.bbox_giou_weight": _moved("stage2_ab.bbox_ciou_weight", "the GIoU term is now CIoU"),
}

_RELOCATIONS = {k[: -len(RELOCATION_SUFFIX)]: v for k, v in LEGACY.items() if k.endswith(RELOCATION_SUFFIX)}
_RELOCATION_TARGETS = {"custom.extra.rollout_matching": "rollout_matching"}


def _leaves(value, path: tuple):
    """(path, value) of every non-mapping value below `path` (an empty mapping counts as a leaf)."""
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            yield from _leaves(sub, path + (key,))
    else:
        yield path, value


def _relocation_issues(doc: Document, prefix: str, path: tuple, value) -> list[Issue]:
    target_root = _RELOCATION_TARGETS[prefix]
    out = []
    for leaf_path, _ in _leaves(value, path):
        sub = render_path(leaf_path[len(path) :]) if len(leaf_path) > len(path) else ""
        new = f"{target_root}.{sub}" if sub else target_root
        entry = LEGACY.get(new)
        note = f"; note that {new} is itself legacy: {entry.message} ({entry.fix})" if entry else ""
        out.append(
            Issue.at(
                doc.where(leaf_path),
                render_path(leaf_path),
                f"legacy key: moved to {new} ({_RELOCATIONS[prefix].message}){note}",
                f"move the value to {new}",
            )
        )
    return out


def check_legacy(doc: Document) -> list[Issue]:
    """Report (and remove from `doc.data`) every legacy key; returns the issues."""
    issues: list[Issue] = []

    def visit(mapping: dict, path: tuple) -> None:
        for key in list(mapping):
            sub_path = path + (key,)
            dotted = render_path(sub_path)
            if dotted in _RELOCATIONS:
                issues.extend(_relocation_issues(doc, dotted, sub_path, mapping.pop(key)))
            elif dotted in LEGACY:
                entry = LEGACY[dotted]
                issues.append(Issue.at(doc.where(sub_path), dotted, f"legacy key: {entry.message}", entry.fix))
                del mapping[key]
            elif isinstance(mapping[key], dict):
                visit(mapping[key], sub_path)

    visit(doc.data, ())
    return issues
