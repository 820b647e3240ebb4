"""DeepSpeed engine layer of the trainer: optimizer, LR schedule, one optimizer step per scheduled step
after a variable number of pack backwards, checkpoints. The process group is toolkit/trainer/distributed.py.

Owns: the DeepSpeed engine and every call into it; HF export, gathered full state and LoRA wrapping
live in toolkit/trainer/export.py (the engine's methods delegate); a padding pack is shipped to ranks without
one by toolkit/trainer/pack_transfer.py. Must not import the config spine (it takes plain arguments) and keeps
`import deepspeed` inside functions, so importing stays cheap.

Accumulation is caller-owned: the DeepSpeed config always has micro batch 1 and GAS 1, and
`Stage2Engine.train_step` runs `engine.backward(loss_p * w_p, scale_wrt_gas=False)` per pack, then
exactly one `engine.step()` — in one call, or incrementally (`begin_step` → `backward_packs` × k →
`end_step`) as the trainer does, one call per round of segments (toolkit/trainer/step.py `StepLearner.learn`;
several rounds in server-mode overlap). Ranks may hold different pack counts: the count is equalized with one
all-reduce (MAX) and short ranks run zero-weight padding packs, because ZeRO-3 forwards all-gather
parameters (every rank must make the same module calls) and ZeRO-2 reduce-scatters per backward
outside `coalesce_grad_reduction`. The weights are the caller's (toolkit/trainer/step.py: n_p / N_raw).
Measured against plain PyTorch (max |Δ| ≤ 1.2e-7, fp32, ZeRO 0-3 and ZeRO-3 offload, 1 and 2 ranks):
tests/trainer/test_engine_equivalence.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from toolkit.trainer import export
from toolkit.trainer.distributed import init_distributed
from toolkit.trainer.pack_transfer import broadcast_pack

log = logging.getLogger(__name__)

# How each ZeRO stage accumulates over the step's packs (measured by
# tests/trainer/test_engine_equivalence.py): "boundary" = set_gradient_accumulation_boundary(last pack);
# "coalesce" = one reduction when the coalesce_grad_reduction block exits.
ACCUMULATION = {0: "boundary", 1: "boundary", 2: "coalesce", 3: "boundary"}
CLIENT_KEY = "stage2_client_state"


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float  # Σ_p w_p·loss_p over this rank's real packs (the objective this rank optimized)
    grad_norm: float | None  # global norm before clipping
    lr: float  # learning rate of the first param group, as used by this step
    lrs: dict[str, float]  # per param group name
    n_packs: int  # real packs on this rank
    n_padding: int  # zero-weight padding packs run on this rank
    n_packs_max: int  # packs every rank ran this step
    pack_metrics: list[dict] = dataclasses.field(default_factory=list)  # loss_fn's aux dict per real pack
    skipped: bool = False  # no rank had a pack: no update, the LR schedule still advanced


def prepare_ds_config(ds_config: dict, max_grad_norm: float) -> dict:
    """Copy of `ds_config` with the fields the caller-owned accumulation needs."""
    for section in ("optimizer", "scheduler"):
        if section in ds_config:
            raise ValueError(
                f"ds_config has an '{section}' section, but the trainer builds the optimizer and "
                f"LR schedule from training.*: remove '{section}' from the DeepSpeed config"
            )
    cfg = {k: v for k, v in ds_config.items() if k not in ("train_batch_size", "managed_gradient_accumulation")}
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, gradient_clipping=float(max_grad_norm))
    if "offload_optimizer" in cfg.get("zero_optimization", {}):
        # DeepSpeed refuses a client torch optimizer under optimizer offload unless told; torch AdamW
        # steps on CPU (exact, slower than the JIT-built DeepSpeedCPUAdam).
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
        log.warning("ZeRO optimizer offload with torch AdamW: the optimizer step runs in torch on CPU")
    return cfg


class Stage2Engine:
    """A DeepSpeed engine driven one scheduled step at a time (see `train_step`)."""

    def __init__(
        self,
        model,
        optimizer,
        lr_scheduler,
        ds_config: dict,
        max_grad_norm: float = 1.0,
        accumulation: str | None = None,
    ):
        import deepspeed

        self.dist = init_distributed()
        self.config = prepare_ds_config(ds_config, max_grad_norm)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=self.config
        )
        self.zero_stage = int(self.engine.zero_optimization_stage())
        self.accumulation = accumulation or ACCUMULATION[self.zero_stage]
        if self.accumulation not in ("boundary", "coalesce") or (self.accumulation, self.zero_stage) == ("coalesce", 0):
            raise ValueError(
                f"accumulation must be 'boundary' or (ZeRO 1-3) 'coalesce', got {self.accumulation!r} "
                f"on ZeRO-{self.zero_stage}"
            )
        self._step: _OpenStep | None = None
        log.info(
            "[rank %d] engine: ZeRO-%d, world %d, accumulation=%s",
            self.dist.rank,
            self.zero_stage,
            self.dist.world_size,
            self.accumulation,
        )

    @property
    def module(self):
        return self.engine.module

    # ---- one scheduled step -------------------------------------------------------------------
    def train_step(
        self, packs: list, loss_fn: Callable[[Any, Any], tuple[torch.Tensor, dict]], weights: Sequence[float]
    ) -> StepResult:
        """Backward every pack with its weight, then exactly one optimizer step (+ LR step, zero_grad).

        `loss_fn(model, pack) -> (loss, aux)` must run its forwards through `model` (the DeepSpeed
        engine; submodules via `model.module`): the engine's forward hooks drive ZeRO's backward.
        DeepSpeed averages gradients over data-parallel ranks, so weights are per-rank shares: the
        update is that of Σ_r Σ_p w_p·loss_p / world_size. The trainer's w_p = n_segments_p / N_raw_local
        with a per-sample-mean pack loss (toolkit/trainer/step.py) makes that the mean over the step's
        raw samples, because every rank holds the step budget's E/W of them.

        Collective: every rank calls it once per step, packs or not. Short ranks run `loss × 0.0`
        padding packs (their own last pack; a rank with none gets one broadcast from a rank that has
        packs), so under ZeRO-3 every pack of a step must make the same sequence of module calls
        (same channel, same number of forwards, images in all or none). When no rank has a pack,
        nothing is updated and only the LR schedule advances (`skipped`).

        The one-call form of `begin_step` → `backward_packs(..., last=True)` → `end_step`.
        """
        self.begin_step()
        self.backward_packs(packs, loss_fn, weights, last=True)
        return self.end_step()

    def begin_step(self) -> None:
        """Open a step whose packs arrive in several `backward_packs` calls (e.g. per rollout chunk)."""
        if self._step is not None:
            raise RuntimeError("begin_step: the previous step was not ended (call end_step)")
        self._step = _OpenStep()

    def backward_packs(
        self,
        packs: list,
        loss_fn: Callable[[Any, Any], tuple[torch.Tensor, dict]],
        weights: Sequence[float],
        *,
        last: bool,
    ) -> None:
        """Backward some of the step's packs (see `train_step` for loss_fn, weights and padding).

        Collective, with one pack-count all-reduce per call: every rank makes the same number of calls
        per step and passes the same `last` (True on exactly the final call). Weights are shares of
        the whole step (w_p = n_p / N_raw with the step's N_raw), so any split of the same packs into
        calls gives the gradient of one call. The DeepSpeed accumulation boundary falls on the last
        backward of the `last` call; when no rank has a pack in that call but earlier calls had, every
        rank runs one zero-weight padding pack there, so the boundary still falls on a backward.
        """
        st = self._open_step("backward_packs")
        if st.last_seen:
            raise RuntimeError("backward_packs: the step's last call was made already (call end_step)")
        if len(packs) != len(weights):
            raise ValueError(f"backward_packs: {len(packs)} packs but {len(weights)} weights")
        st.last_seen = last
        pad = packs[-1] if packs else st.pad
        n_max, every_rank_has_pad, src = self._agree_pack_counts(len(packs), pad is not None)
        if last and n_max == 0 and st.n_max_total and self.accumulation == "boundary":
            n_max = 1  # the boundary must fall on a backward: one all-padding round
        if n_max == 0:
            return
        if not every_rank_has_pad:
            pad = broadcast_pack(pad, src, self.dist.rank, self.engine.device)
        st.pad = pad
        if st.block is None:  # ZeRO-2: one reduction when the block exits in end_step
            st.block = contextlib.ExitStack()
            st.block.enter_context(self._accumulation_block())
        schedule = list(zip(packs, map(float, weights))) + [(pad, 0.0)] * (n_max - len(packs))
        for i, (pack, weight) in enumerate(schedule):
            if self.accumulation == "boundary":
                self.engine.set_gradient_accumulation_boundary(last and i == n_max - 1)
            loss, aux = loss_fn(self.engine, pack)
            # A finite loss × 0.0 backpropagates exact zeros: adding them changes no gradient bit.
            self.engine.backward(loss * weight, scale_wrt_gas=False)
            if i < len(packs):
                st.total += loss.detach().double().cpu() * weight  # a device sync point, once per pack
                st.metrics.append(aux)
            del loss, aux  # frees the graph's activations before the next pack
        st.n_packs += len(packs)
        st.n_max_total += n_max

    def end_step(self) -> StepResult:
        """One optimizer step over everything `backward_packs` accumulated since `begin_step`."""
        st = self._open_step("end_step")
        self._step = None
        if st.block is not None:
            st.block.close()  # ZeRO-2: the coalesced gradient reduction runs here
        if st.n_max_total == 0:
            return self._skip_step()
        if not st.last_seen:
            raise RuntimeError("end_step: no backward_packs(..., last=True) call ended this step")
        lrs = self._lrs()
        local_norm = self._local_grad_norm() if self.zero_stage == 0 else None
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = local_norm if norm is None else float(norm)
        return StepResult(
            loss=float(st.total),
            grad_norm=norm,
            lr=next(iter(lrs.values())),
            lrs=lrs,
            n_packs=st.n_packs,
            n_padding=st.n_max_total - st.n_packs,
            n_packs_max=st.n_max_total,
            pack_metrics=st.metrics,
        )

    def _open_step(self, caller: str) -> _OpenStep:
        if self._step is None:
            raise RuntimeError(f"{caller}: no step is open (call begin_step first)")
        return self._step

    def _agree_pack_counts(self, n_local: int, has_pad: bool) -> tuple[int, bool, int]:
        """One all-reduce (MAX) → (max count, whether every rank holds a padding pack, highest rank holding one)."""
        import torch.distributed as dist

        counts = torch.tensor(
            [n_local, -int(has_pad), self.dist.rank if has_pad else -1], dtype=torch.int64, device=self.engine.device
        )
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        every_rank_has_pad = int(counts[1]) == -1  # MAX of -has_pad is -1 only when no rank lacks one
        return int(counts[0]), every_rank_has_pad, int(counts[2])

    def _skip_step(self) -> StepResult:
        lrs = self._lrs()
        if self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.step()  # the schedule follows scheduled steps, not updates
        log.info("[rank %d] no packs on any rank: optimizer step skipped", self.dist.rank)
        return StepResult(
            loss=0.0,
            grad_norm=None,
            lr=next(iter(lrs.values())),
            lrs=lrs,
            n_packs=0,
            n_padding=0,
            n_packs_max=0,
            skipped=True,
        )

    def _lrs(self) -> dict[str, float]:
        return {g.get("name", str(k)): float(g["lr"]) for k, g in enumerate(self.engine.optimizer.param_groups)}

    def _accumulation_block(self):
        if self.accumulation == "coalesce":
            # One reduction when the block exits: ZeRO-2 otherwise reduce-scatters in every backward.
            return self.engine.coalesce_grad_reduction()
        return contextlib.nullcontext()

    def _local_grad_norm(self) -> float | None:
        """ZeRO-0 keeps no norm; after the boundary all-reduce every rank holds the averaged grads."""
        norms = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None

    # ---- small collectives ----------------------------------------------------------------------
    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def all_reduce_max(self, value: float) -> float:
        """MAX of a scalar over ranks (e.g. a stop flag); collective."""
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0])

    # ---- generation -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def generation_context(self):
        """Eval + no_grad with full parameters, for HF `generate` on the module this yields.

        Under ZeRO-3 (collective on entry and exit) every parameter is gathered and the ZeRO-3 module
        hooks are taken off, so ranks may then run different numbers of forwards (prompt lengths,
        EOS): with the hooks on, each root forward may run a collective (trace check) and deadlock.
        """
        import deepspeed

        was_training = self.module.training
        self.module.eval()
        params = list(self.module.parameters()) if self.zero_stage == 3 else []
        try:
            with (
                torch.no_grad(),
                deepspeed.zero.GatheredParameters(params, enabled=bool(params)),
                self._zero3_hooks_removed(),
            ):
                yield self.module
        finally:
            self.module.train(was_training)

    @contextlib.contextmanager
    def _zero3_hooks_removed(self):
        if self.zero_stage != 3:
            yield
            return
        offload = self.engine.optimizer.parameter_offload
        offload._remove_module_hooks()  # sub-module fetch/release hooks and the root's reset_step hook
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            # As deepspeed.runtime.zero.stage3.unwrap_model_for_generation, plus the root hook it keeps.
            offload._register_deepspeed_module(offload.module)
            coordinator = offload.get_param_coordinator
            offload.fwd_pre_hook = offload.module.register_forward_pre_hook(
                lambda module, *args: coordinator().reset_step(), prepend=True
            )

    # ---- checkpoints and export -----------------------------------------------------------------
    def save(self, directory: str, tag: str | None = None, client_state: dict | None = None) -> None:
        """DeepSpeed checkpoint (params, optimizer, LR scheduler) + client_state. All ranks call it.

        `tag` None: DeepSpeed's `global_step<N>` tag, recorded in `<directory>/latest`.
        """
        # Under one key: load_checkpoint hands back every top-level entry it does not consume itself.
        self.engine.save_checkpoint(str(directory), tag=tag, client_state={CLIENT_KEY: dict(client_state or {})})
        log.info("[rank %d] saved DeepSpeed checkpoint %s/%s", self.dist.rank, directory, tag)

    def load(self, directory: str, tag: str | None = None) -> dict:
        """Restore params, optimizer and scheduler state exactly; returns the saved client_state."""
        path, client_state = self.engine.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag or 'latest'!r} under {directory}")
        log.info("[rank %d] loaded DeepSpeed checkpoint %s", self.dist.rank, path)
        return dict((client_state or {}).get(CLIENT_KEY, {}))

    def named_full_params(self, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor on `device`) per parameter and persistent buffer, LoRA merged.

        Collective under ZeRO-3: every rank must exhaust the iterator (see `export.named_full_params`).
        """
        return export.named_full_params(self.module, self.zero_stage == 3, device)

    def full_state_dict(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Gathered named tensors (LoRA merged) on every rank; collective under ZeRO-3."""
        return dict(self.named_full_params(device))

    def export_hf(self, directory: str, tokenizer=None) -> None:
        """HF `save_pretrained` (safetensors, LoRA merged) on rank 0; all ranks call it."""
        export.export_hf(self.module, self.zero_stage == 3, self.dist.rank, directory, tokenizer)


@dataclasses.dataclass
class _OpenStep:
    """What a step accumulates between begin_step and end_step."""

    total: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    metrics: list = dataclasses.field(default_factory=list)
    n_packs: int = 0  # real packs on this rank
    n_max_total: int = 0  # backwards every rank ran (real + padding), the same on all ranks
    pad: Any = None  # this rank's last real pack so far, or the broadcast one: the padding pack
    block: contextlib.ExitStack | None = None  # the accumulation block, entered at the first backward
    last_seen: bool = False  # the call with last=True was made
