"""The learning half of one optimizer step, public so tests drive exactly the code that trains:
segments → packs → per-pack loss (the channel's forwards + `pack_loss`) → weighted engine backwards →
one `engine.step()`.

Owns `StepLearner`: the per-pack loss of each channel, the pack weights, and `learn`, which takes a step's
segments in rounds — one round (Channel-A; Channel-B from hf or vLLM colocate) or one per server round
(Channel-B in vLLM server mode) — and packs each with the same `RoundPacker`. `Stage2Trainer.train_step`
(toolkit/trainer/loop.py) builds the rounds and calls it; tests/trainer/_channel_worker.py calls the same
method on real segments.

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
from toolkit.trainer.packing import RoundPacker


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
        return cls(
            coord_ids=coord_ids,
            loss_weights=LossWeights.from_mapping(sab.to_dict()),
            normalization=sab.loss_normalization,
            n_softctx_iter=sab.n_softctx_iter,
            softctx_temperature=sab.softctx_temperature,
            softctx_grad_mode=sab.softctx_grad_mode,
            capacity=cfg.global_max_length,
            min_fill=cfg.training.packing_min_fill_ratio,
            packing=cfg.training.packing,
            device=device,
            vision=vision,
            mrope=mrope,
        )

    # ---- the per-pack loss ------------------------------------------------------------------------
    def loss_fn(self, channel: str):
        """`(module, pack) -> (loss, parts)` for the engine: Channel-A soft self-context or one Channel-B forward."""
        return self.loss_a if channel == "A" else self.loss_b

    def loss_a(self, module, pack):
        pack = pack.to(self.device)
        first, last = softctx_logits(
            module,
            pack,
            self.coord_ids,
            self.n_softctx_iter,
            self.softctx_temperature,
            self.softctx_grad_mode,
            model_kwargs=self._vision_inputs(pack),
        )
        return pack_loss(first, last, pack, self.coord_ids, self.loss_weights, self.normalization)

    def loss_b(self, module, pack):
        pack = pack.to(self.device)
        # position_ids restart per segment and use_cache=False keeps transformers' packed block-causal
        # mask (toolkit/trainer/packing.py): without either, segments would attend to each other.
        logits = module(
            input_ids=pack.input_ids,
            position_ids=pack.position_ids,
            use_cache=False,
            logits_to_keep=pack.logit_rows,  # only the rows the loss reads (never a prompt's or image's)
            **self._vision_inputs(pack),
        ).logits
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
    def packer(self) -> RoundPacker:
        """Post-rollout packing to `capacity` (FIFO vs bin-packing, carried across rounds), or one segment per pack."""
        return RoundPacker(self.capacity, self.min_fill, self.packing, mrope=self.mrope)

    # ---- one step ---------------------------------------------------------------------------------
    def learn(self, engine, channel: str, rounds: Iterable[tuple[list, bool]], n_raw: int):
        """One optimizer step over `rounds` of (segments, is the step's last round): each round's segments
        are packed and backpropagated as soon as they arrive (the last round packs everything left).
        → (StepResult, packs, n_segments, learn_s), learn_s = packing, backwards and the optimizer step.
        Collective: every rank calls it once per step, with the same number of rounds and the same last one."""
        packer, loss_fn = self.packer(), self.loss_fn(channel)
        packs: list = []
        n_segments, learn_s, ended = 0, 0.0, False
        engine.begin_step()
        for segments, last in rounds:
            t0 = time.perf_counter()
            n_segments += len(segments)
            self._backward(engine, loss_fn, packer.add(segments, last=last), n_raw, packs, last)
            learn_s += time.perf_counter() - t0
            ended = ended or last
        t0 = time.perf_counter()
        if not ended:  # no round at all (no samples): the step still closes on every rank
            self._backward(engine, loss_fn, packer.flush(), n_raw, packs, True)
        res = engine.end_step()
        return res, packs, n_segments, learn_s + time.perf_counter() - t0

    @staticmethod
    def _backward(engine, loss_fn, new_packs: list, n_raw: int, packs: list, last: bool) -> None:
        engine.backward_packs(new_packs, loss_fn, pack_weights(new_packs, n_raw), last=last)
        packs += new_packs

    # ---- what the step reports ----------------------------------------------------------------------
    def add_metrics(self, m, res, packs: list) -> None:
        """Loss parts weighted by segment count, optimizer facts and packing fill of one `learn` result."""
        for pack, parts in zip(packs, res.pack_metrics):
            m.add_means(parts, weight=pack.n_segments)
        m.add_sum("loss/weighted_step", res.loss)
        m.add_max("train/grad_norm", res.grad_norm if res.grad_norm is not None else 0.0)
        m.add_max("train/learning_rate", res.lr)
        m.add_sum("packing/packs", res.n_packs)
        m.add_sum("packing/padding_packs", res.n_padding)
        for i, pack in enumerate(packs):
            m.add_mean("packing/post_rollout_fill", pack.total_len / self.capacity)
            # The last pack of a step takes the remainder; only earlier packs below min fill are a planning smell.
            underfilled = pack.total_len < self.min_fill * self.capacity
            m.add_sum("packing/underfilled_packs", i < len(packs) - 1 and underfilled)
            m.add_max("packing/post_rollout_selected_total_len", pack.total_len)
