"""Optimizer and LR schedule: torch AdamW with per-module learning rates (llm / vit / aligner), no weight
decay on biases and norms, and linear warmup + constant | linear | cosine decay.

Trainer room: imports torch. The engine passes the optimizer to DeepSpeed as a client optimizer (a torch
AdamW is bit-identical to plain PyTorch and avoids DeepSpeed's JIT-built FusedAdam on CPU).
"""

from __future__ import annotations

import functools
import logging
import math

import torch

log = logging.getLogger(__name__)

# Parameter-name components that select the per-module learning rates (Qwen-VL, LLaVA, InternVL, ...).
# The aligner is checked first: Qwen-VL keeps its merger inside `visual`.
VIT_PARTS = frozenset({"visual", "vision_tower", "vision_model"})
ALIGNER_PARTS = frozenset({"merger", "deepstack_merger_list", "multi_modal_projector", "aligner"})
SCHEDULES = ("constant", "linear", "cosine")


def param_role(name: str) -> str:
    """'vit', 'aligner' or 'llm' from a parameter name."""
    parts = set(name.split("."))
    if parts & ALIGNER_PARTS:
        return "aligner"
    return "vit" if parts & VIT_PARTS else "llm"


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "norm" in name.lower()


def build_optimizer(
    model,
    lr: float,
    vit_lr: float | None = None,
    aligner_lr: float | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """torch AdamW over trainable params, grouped by role (vit / aligner / llm) × decay / no-decay.

    `vit_lr`/`aligner_lr` None means `lr`. A role whose lr is 0 is frozen (requires_grad=False, so no
    engine reduces gradients nobody steps); empty groups are dropped. Biases and norms get no decay.
    """
    role_lr = {"llm": lr, "vit": lr if vit_lr is None else vit_lr, "aligner": lr if aligner_lr is None else aligner_lr}
    buckets: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = param_role(name)
        if role_lr[role] == 0:
            param.requires_grad_(False)
            continue
        buckets.setdefault((role, _no_decay(name, param)), []).append(param)
    groups = [
        {
            "name": f"{role}{'_no_decay' if nd else ''}",
            "params": params,
            "lr": role_lr[role],
            "weight_decay": 0.0 if nd else weight_decay,
        }
        for (role, nd), params in sorted(buckets.items())
    ]
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters with a non-zero learning rate")
    for g in groups:
        log.info(
            "optimizer group %s: %d tensors, %d params, lr=%g, weight_decay=%g",
            g["name"],
            len(g["params"]),
            sum(p.numel() for p in g["params"]),
            g["lr"],
            g["weight_decay"],
        )
    frozen = [r for r, v in role_lr.items() if v == 0]
    if frozen:
        log.info("optimizer: frozen by lr=0: %s", ", ".join(frozen))
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def lr_lambda(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """LR multiplier for optimizer step `step` (0-based).

    1) warmup: (step+1)/warmup_steps, so the first step already moves; 2) then constant, linear to 0
    or cosine to 0 over the remaining steps (progress measured from the end of warmup).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {kind!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer, total_steps: int, warmup_steps: int, kind: str):
    """LambdaLR over `lr_lambda` (the same multiplier for every param group)."""
    lr_lambda(0, total_steps, warmup_steps, kind)  # fail fast on a bad kind
    fn = functools.partial(lr_lambda, total_steps=total_steps, warmup_steps=warmup_steps, kind=kind)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def reapply_schedule(sched) -> None:
    """Set every group's lr from the schedule at its current step. After a resume that extends a run (a larger
    training.max_steps), the lr restored with the optimizer is the old schedule's (0 at the end of a finished
    cosine run); the scheduler, built with the new total, gives the lr a run planned that way has at this
    step. Same total: no change. `sched` None (no scheduler): nothing to do."""
    if sched is None:
        return
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)
