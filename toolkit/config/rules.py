"""Cross-field rules: checks that need several typed keys at once (pass 2, after the schema).

Each rule takes a RuleContext (typed config with defaults, the merged raw data, positions, learner
world size) and returns Issues. `rollout_backend` and `vllm.mode` dispatch to their own rule sets
(the discriminator pattern), so a rule for server mode never runs on an hf profile. Imports stdlib.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from toolkit.config.errors import WARNING, Issue
from toolkit.config.yamlio import Document, render_path


@dataclass
class RuleContext:
    cfg: dict  # typed, defaults filled
    raw: dict  # merged data as written (post legacy check), to tell explicit keys from defaults
    doc: Document
    world_size: int

    def issue(self, path: tuple, message: str, fix: str, severity: str = "error") -> Issue:
        return Issue.at(self.doc.where(path), render_path(path), message, fix, severity)

    def explicit(self, path: tuple) -> bool:
        node = self.raw
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True


Rule = Callable[[RuleContext], list]
_EBS = ("training", "effective_batch_size")


def batch_factors(cfg: dict, world_size: int) -> tuple[int, int, int]:
    """(E, P, W) of a typed config."""
    return cfg["training"]["effective_batch_size"], cfg["training"]["per_device_train_batch_size"], world_size


def batch_split_error(e: int, p: int, w: int) -> str | None:
    """Why E raw samples cannot be split over W ranks × P per micro-step (E % (P × W) != 0), else None.
    The one divisibility check: the `effective_batch_divisible` issue and normalize.derive's ValueError."""
    if w >= 1 and e % (p * w) == 0:
        return None
    return (
        f"effective_batch_size={e} is not divisible by per_device_train_batch_size × learner_world_size = "
        f"{p} × {w} = {p * w} (no rounding up: every optimizer step must see exactly E raw samples)"
    )


def effective_batch_divisible(ctx: RuleContext) -> list:
    """training.effective_batch_size must be divisible by per_device_train_batch_size × learner_world_size."""
    e, p, w = batch_factors(ctx.cfg, ctx.world_size)
    message = batch_split_error(e, p, w)
    if message is None:
        return []
    lower, upper = (e // (p * w)) * p * w, (e // (p * w) + 1) * p * w
    options = " or ".join(str(v) for v in (lower, upper) if v > 0)
    return [
        ctx.issue(
            _EBS,
            message,
            f"set training.effective_batch_size to a multiple of {p * w} ({options}), or change "
            f"per_device_train_batch_size or the number of learner ranks",
        )
    ]


def gradient_accumulation_consistent(ctx: RuleContext) -> list:
    """An explicit training.gradient_accumulation_steps must equal E / (P × W)."""
    e, p, w = batch_factors(ctx.cfg, ctx.world_size)
    given = ctx.cfg["training"]["gradient_accumulation_steps"]
    if given is None or batch_split_error(e, p, w) or given == e // (p * w):
        return []
    return [
        ctx.issue(
            ("training", "gradient_accumulation_steps"),
            f"gradient_accumulation_steps={given} conflicts with the derived value {e // (p * w)} "
            f"= effective_batch_size / (per_device_train_batch_size × learner_world_size) "
            f"= {e} / ({p} × {w})",
            "remove training.gradient_accumulation_steps (it is derived)",
        )
    ]


def packing_buffer_holds_step(ctx: RuleContext) -> list:
    """One rank's raw samples per step (E / W) must fit in training.packing_buffer."""
    e, p, w = batch_factors(ctx.cfg, ctx.world_size)
    buf = ctx.cfg["training"]["packing_buffer"]
    if batch_split_error(e, p, w) or e // w <= buf:
        return []
    return [
        ctx.issue(
            ("training", "packing_buffer"),
            f"packing_buffer={buf} cannot hold one rank's step budget: effective_batch_size / "
            f"learner_world_size = {e} / {w} = {e // w} segments are packed together each step",
            f"raise training.packing_buffer to at least {e // w}, lower effective_batch_size, or add learner ranks",
        )
    ]


def decode_batch_overrides_eval(ctx: RuleContext) -> list:
    """rollout_matching.decode_batch_size overrides training.per_device_eval_batch_size (warning)."""
    d = ctx.cfg["rollout_matching"]["decode_batch_size"]
    e = ctx.cfg["training"]["per_device_eval_batch_size"]
    if d == e or not ctx.explicit(("training", "per_device_eval_batch_size")):
        return []
    return [
        ctx.issue(
            ("training", "per_device_eval_batch_size"),
            f"per_device_eval_batch_size={e} is ignored: rollout-aware eval decodes in microbatches "
            f"of rollout_matching.decode_batch_size={d}",
            "remove training.per_device_eval_batch_size; set rollout_matching.decode_batch_size",
            WARNING,
        )
    ]


def deepspeed_config_required(ctx: RuleContext) -> list:
    """deepspeed.config is required when deepspeed.enabled is true."""
    ds = ctx.cfg["deepspeed"]
    if not ds["enabled"] or ds["config"] is not None:
        return []
    return [
        ctx.issue(
            ("deepspeed", "config"),
            "deepspeed.enabled is true but deepspeed.config is not set",
            "set deepspeed.config to a name from ds_configs/ (e.g. zero2)",
        )
    ]


def eval_needs_val_data(ctx: RuleContext) -> list:
    """training.eval_strategy: steps needs data.val_jsonl."""
    if ctx.cfg["training"]["eval_strategy"] != "steps" or ctx.cfg["data"]["val_jsonl"] is not None:
        return []
    return [
        ctx.issue(
            ("training", "eval_strategy"),
            "eval_strategy is steps but data.val_jsonl is not set",
            "set data.val_jsonl, or training.eval_strategy: no",
        )
    ]


def sampling_needs_temperature(ctx: RuleContext) -> list:
    """decode_mode: sample needs decoding.temperature > 0; greedy ignores a temperature (warning)."""
    rm = ctx.cfg["rollout_matching"]
    temp = rm["decoding"]["temperature"]
    path = ("rollout_matching", "decoding", "temperature")
    if rm["decode_mode"] == "sample" and temp == 0.0:
        return [
            ctx.issue(
                path,
                "decode_mode is sample but decoding.temperature is 0",
                "set rollout_matching.decoding.temperature > 0, or decode_mode: greedy",
            )
        ]
    if rm["decode_mode"] == "greedy" and temp > 0.0:
        return [
            ctx.issue(
                path,
                f"decoding.temperature={temp} is ignored with decode_mode: greedy",
                "remove it, or set rollout_matching.decode_mode: sample",
                WARNING,
            )
        ]
    return []


# ---- rollout_backend: vllm ------------------------------------------------------------------------


def resolve_sync_mode(cfg: dict) -> str:
    """vllm.sync.mode with auto resolved: adapter when LoRA adapters are trained and served, else full."""
    mode = cfg["rollout_matching"]["vllm"]["sync"]["mode"]
    if mode != "auto":
        return mode
    lora = cfg["tuner"]["train_type"] == "lora" and cfg["rollout_matching"]["vllm"]["enable_lora"]
    return "adapter" if lora else "full"


def vllm_max_model_len(ctx: RuleContext) -> list:
    """vllm.max_model_len is required with the vllm backend and must exceed max_new_tokens."""
    path = ("rollout_matching", "vllm", "max_model_len")
    mml = ctx.cfg["rollout_matching"]["vllm"]["max_model_len"]
    new = ctx.cfg["rollout_matching"]["max_new_tokens"]
    if mml is None:
        return [
            ctx.issue(
                path,
                "rollout_backend is vllm but vllm.max_model_len is not set",
                "set rollout_matching.vllm.max_model_len (prompt + completion tokens, e.g. 12000)",
            )
        ]
    if new >= mml:
        return [
            ctx.issue(
                path,
                f"max_model_len={mml} leaves no room for a prompt with max_new_tokens={new}",
                "raise rollout_matching.vllm.max_model_len or lower rollout_matching.max_new_tokens",
            )
        ]
    return []


def vllm_sync_mode(ctx: RuleContext) -> list:
    """vllm.sync.mode must resolve to full with several learner ranks; adapter needs LoRA on both sides."""
    path = ("rollout_matching", "vllm", "sync", "mode")
    given = ctx.cfg["rollout_matching"]["vllm"]["sync"]["mode"]
    resolved = resolve_sync_mode(ctx.cfg)
    out = []
    if (
        given == "adapter"
        and resolved == "adapter"
        and not (ctx.cfg["tuner"]["train_type"] == "lora" and ctx.cfg["rollout_matching"]["vllm"]["enable_lora"])
    ):
        out.append(
            ctx.issue(
                path,
                "sync.mode adapter needs tuner.train_type: lora and vllm.enable_lora: true",
                "set rollout_matching.vllm.sync.mode: full, or train and serve LoRA adapters",
            )
        )
    if ctx.world_size > 1 and resolved != "full":
        out.append(
            ctx.issue(
                path,
                f"sync.mode {given} resolves to {resolved}, but learner world size is "
                f"{ctx.world_size}; only full sync is supported with several learner ranks",
                "set rollout_matching.vllm.sync.mode: full",
            )
        )
    return out


def server_list_valid(ctx: RuleContext) -> list:
    """Server mode needs a non-empty servers[] of http(s)://host:port URLs with distinct endpoints."""
    base = ("rollout_matching", "vllm", "server", "servers")
    servers = ctx.cfg["rollout_matching"]["vllm"]["server"]["servers"]
    if not servers:
        return [
            ctx.issue(
                base,
                "vllm.mode is server but vllm.server.servers is empty",
                "add servers: [{base_url: http://127.0.0.1:8000, group_port: 51216}]",
            )
        ]
    out, used = [], {}  # (host, port) → "servers[i].key" that took it
    for i, srv in enumerate(servers):
        url = srv["base_url"]
        try:  # urlsplit itself raises on a broken IPv6 literal (`http://[::1`), .port on a bad port
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            out.append(
                ctx.issue(
                    base + (i, "base_url"),
                    f"base_url {url!r} is not an http(s) URL with host and port",
                    "write it as http://HOST:PORT (e.g. http://127.0.0.1:8000)",
                )
            )
            continue
        for key, number in (("base_url", port), ("group_port", srv["group_port"])):
            endpoint = (parts.hostname, number)
            if endpoint in used:
                out.append(
                    ctx.issue(
                        base + (i, key),
                        f"port {number} on {parts.hostname} is already used by {used[endpoint]}",
                        "give every server its own HTTP port and group_port",
                    )
                )
            used.setdefault(endpoint, f"servers[{i}].{key}")
    return out


VLLM_MODE_RULES: dict[str, tuple[Rule, ...]] = {
    "colocate": (),
    "server": (server_list_valid,),
}


def vllm_mode_dispatch(ctx: RuleContext) -> list:
    """Run the rules of the configured vllm.mode (colocate | server)."""
    mode = ctx.cfg["rollout_matching"]["vllm"]["mode"]
    return [i for rule in VLLM_MODE_RULES[mode] for i in rule(ctx)]


BACKEND_RULES: dict[str, tuple[Rule, ...]] = {
    "hf": (),
    "vllm": (vllm_max_model_len, vllm_sync_mode, vllm_mode_dispatch),
}


def backend_dispatch(ctx: RuleContext) -> list:
    """Run the rules of the configured rollout_backend (hf | vllm)."""
    backend = ctx.cfg["rollout_matching"]["rollout_backend"]
    return [i for rule in BACKEND_RULES[backend] for i in rule(ctx)]


RULES: tuple[Rule, ...] = (
    effective_batch_divisible,
    gradient_accumulation_consistent,
    packing_buffer_holds_step,
    decode_batch_overrides_eval,
    deepspeed_config_required,
    eval_needs_val_data,
    sampling_needs_temperature,
    backend_dispatch,
)


def all_rules() -> list[Rule]:
    """Every rule, dispatched ones included (for docs and for the 'N rules skipped' count)."""
    out = [r for r in RULES if r is not backend_dispatch]
    for rules in list(BACKEND_RULES.values()) + list(VLLM_MODE_RULES.values()):
        out.extend(r for r in rules if r is not vllm_mode_dispatch and r not in out)
    return out


def run_rules(ctx: RuleContext) -> list:
    """All cross-field issues (errors and warnings) of a typed config."""
    return [issue for rule in RULES for issue in rule(ctx)]
