"""The learning half of one optimizer step, public so tests drive exactly the code that trains:
segments → packs → per-pack loss (the channel's forwards + `pack_loss`) → weighted engine backwards →
one `engine.step()`.

Owns `StepLearner`: the per-pack loss of each channel, the pack weights, and the two ways a step's
segments arrive — all at once (`learn`) or one server round at a time (`learn_rounds`, Channel-B in vLLM
server mode). `Stage2Trainer.train_step` (toolkit/trainer/loop.py) builds the segments and calls these;
tests/trainer/_channel_worker.py calls the same methods on real segments.

Weights: pack p backpropagates loss_p · n_p / N_raw, n_p = its samples, N_raw = this rank's raw samples
(dropped ones included). `pack_loss` returns a mean over the pack's samples, so under the default
`per_sample` normalization the step objective is (1/N_raw) Σ_samples loss_sample on every rank, and
DeepSpeed's average over ranks (every rank holds E/W raw samples) makes it the mean over the step's E
raw samples: no denominator depends on how segments fall into packs, rounds or ranks, so none needs an
all-reduce. Under `per_pack_token_mean` the same weights give the predecessor's objective.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from toolkit.trainer.channel_a import softctx_logits
from toolkit.trainer.losses import LossWeights, pack_loss
from toolkit.trainer.packing import RoundPacker, collate_pack, plan_packs


def pack_weights(packs: list, n_raw: int) -> list[float]:
    """w_p = n_p / N_raw: each pack's loss is a mean over its samples, so this weighs every sample 1 / N_raw."""
    return [p.n_segments / n_raw for p in packs]


@dataclass(frozen=True)
class StepLearner:
    """The trainer's step code after the segments exist (see the module docstring).

    coord_ids: the 1000 coordinate token ids (a long tensor on `device`), bin k at index k.
    capacity / min_fill / packing: global_max_length, training.packing_min_fill_ratio, training.packing.
    vision: a VisionProcessor for a Qwen-VL model (pixel inputs per pack), else None; mrope likewise.
    """

    coord_ids: Any
    loss_weights: LossWeights
    normalization: str
    n_softctx_iter: int
    softctx_temperature: float
    softctx_grad_mode: str
    capacity: int
    min_fill: float
    packing: bool = True
    device: Any = "cpu"
    vision: Any = None
    mrope: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, cfg, coord_ids, device, vision=None, mrope=None) -> StepLearner:
        """From the resolved config (stage2_ab, training, global_max_length)."""
        sab = cfg.stage2_ab
        return cls(coord_ids=coord_ids, loss_weights=LossWeights.from_mapping(sab.to_dict()),
                   normalization=sab.loss_normalization, n_softctx_iter=sab.n_softctx_iter,
                   softctx_temperature=sab.softctx_temperature, softctx_grad_mode=sab.softctx_grad_mode,
                   capacity=cfg.global_max_length, min_fill=cfg.training.packing_min_fill_ratio,
                   packing=cfg.training.packing, device=device, vision=vision, mrope=mrope)

    # ---- the per-pack loss ------------------------------------------------------------------------
    def loss_fn(self, channel: str):
        """`(module, pack) -> (loss, parts)` for the engine: Channel-A soft self-context or one Channel-B forward."""
        return self.loss_a if channel == "A" else self.loss_b

    def loss_a(self, module, pack):
        pack = pack.to(self.device)
        first, last = softctx_logits(module, pack, self.coord_ids, self.n_softctx_iter, self.softctx_temperature,
                                     self.softctx_grad_mode, model_kwargs=self._vision_inputs(pack))
        return pack_loss(first, last, pack, self.coord_ids, self.loss_weights, self.normalization)

    def loss_b(self, module, pack):
        pack = pack.to(self.device)
        # position_ids restart per segment and use_cache=False keeps transformers' packed block-causal
        # mask (toolkit/trainer/packing.py): without either, segments would attend to each other.
        logits = module(input_ids=pack.input_ids, position_ids=pack.position_ids, use_cache=False,
                        **self._vision_inputs(pack)).logits
        return pack_loss(logits, logits, pack, self.coord_ids, self.loss_weights, self.normalization)

    def _vision_inputs(self, pack) -> dict:
        """Pixel patches + grids of the pack's images, in segment order (nothing for text packs): those the
        rollouts already patched when the pack carries them, else patched here."""
        if not self.vision:
            return {}
        if pack.pixels is not None:
            return {k: v.to(self.device) for k, v in pack.pixels.items()}
        return self.vision.model_inputs(pack.images, self.device)

    # ---- packing ----------------------------------------------------------------------------------
    def plan(self, segments: list) -> list:
        """Post-rollout packing to `capacity` (FIFO vs bin-packing), or one segment per pack; collated."""
        if self.packing:
            plan = plan_packs([len(s) for s in segments], self.capacity)
        else:
            plan = [[i] for i in range(len(segments))]
        return [collate_pack([segments[i] for i in idx], mrope=self.mrope) for idx in plan]

    # ---- one step ---------------------------------------------------------------------------------
    def learn(self, engine, channel: str, segments: list, n_raw: int):
        """Pack the step's segments, backward every pack, one optimizer step → (StepResult, packs).
        Collective: every rank calls it once per step (with or without segments)."""
        packs = self.plan(segments)
        return engine.train_step(packs, self.loss_fn(channel), pack_weights(packs, n_raw)), packs

    def learn_rounds(self, engine, rounds: Iterable[list], n_raw: int):
        """Channel-B one round at a time: each round's segments are packed (RoundPacker) and backpropagated
        as soon as they arrive, the rest after the last round; one optimizer step.
        → (StepResult, packs, n_segments, learn_s). Collective: every rank sees the same number of rounds."""
        packer = RoundPacker(self.capacity, self.min_fill, self.packing, mrope=self.mrope)
        packs: list = []
        n_segments, learn_s = 0, 0.0
        engine.begin_step()
        for segments in rounds:
            n_segments += len(segments)
            learn_s += self._backward_b(engine, packer.add(segments), n_raw, packs, last=False)
        learn_s += self._backward_b(engine, packer.flush(), n_raw, packs, last=True)
        return engine.end_step(), packs, n_segments, learn_s

    def _backward_b(self, engine, new_packs: list, n_raw: int, packs: list, *, last: bool) -> float:
        t0 = time.perf_counter()
        engine.backward_packs(new_packs, self.loss_b, pack_weights(new_packs, n_raw), last=last)
        packs += new_packs
        return time.perf_counter() - t0
