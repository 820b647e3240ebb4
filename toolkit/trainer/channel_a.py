"""Channel-A soft self-context: teacher-forced forwards where coordinate-slot inputs are replaced by
the expected coordinate embedding the model itself predicted in the previous pass.

Owns `softctx_logits`. CE must use the first pass (pure ground-truth context); geometry, regularizers
and the gate use the last pass. Imports torch inside functions only; never touches the optimizer or
the loss.

Every forward is `model(inputs_embeds=…, position_ids=…, use_cache=False)`: no input_ids, no
attention mask, no cache, so transformers derives the packed block-causal mask from the per-segment
position ids (see toolkit/trainer/packing.py). A pack with images runs the vision tower once per call, not
once per pass: its output does not depend on the coordinate rows (docs/VLM.md, "Images once").
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from toolkit.trainer.packing import PackBatch

GRAD_MODES = ("unroll", "em_detach")


def _check_args(n_iter: int, temperature: float, grad_mode: str) -> None:
    if n_iter < 1:
        raise ValueError(f"n_softctx_iter must be >= 1, got {n_iter}")
    if not temperature > 0:
        raise ValueError(f"softctx_temperature must be > 0, got {temperature}")
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"softctx_grad_mode must be one of {'|'.join(GRAD_MODES)}, got {grad_mode!r}")


def encode_images_once(model: Any, model_kwargs: Mapping[str, Any]) -> dict:
    """The forward kwargs with `pixel_values` replaced by the vision tower's output, computed here once.

    Every pass then hands the same features (Qwen3-VL: with its DeepStack features) to transformers'
    Qwen-VL forward as `mm_encoder_outputs`, which scatters them into the image rows as `pixel_values`
    would. Computed under the caller's grad mode (that of pass 0), so the gradients of every pass that
    records a graph reach the tower through this one output: the same sum the per-pass towers gave.
    """
    kwargs = dict(model_kwargs)
    pixel_values = kwargs.pop("pixel_values", None)
    if pixel_values is None:
        return kwargs
    get_features = model.get_image_features  # through the DeepSpeed / PEFT wrappers to the HF model's method
    if "mm_encoder_outputs" not in inspect.signature(get_features.__self__.forward).parameters:
        # an older forward would take the kwarg silently into **kwargs and train without the image
        import transformers

        raise RuntimeError(
            f"{type(get_features.__self__).__name__}.forward takes no mm_encoder_outputs in "
            f"transformers {transformers.__version__} (fix: install the version setup.py pins)"
        )
    features = get_features(pixel_values, kwargs.get("image_grid_thw"), return_dict=True)
    kwargs["mm_encoder_outputs"] = {"image": features}
    return kwargs


def _forward(
    model: Any, embeds: torch.Tensor, batch: PackBatch, rows: torch.Tensor, model_kwargs: Mapping[str, Any]
) -> torch.Tensor:
    """[1, K, V] logits at the K `rows` (`batch.logit_rows`): the only rows the loss and the next pass read."""
    out = model(
        inputs_embeds=embeds, position_ids=batch.position_ids, use_cache=False, logits_to_keep=rows, **model_kwargs
    )
    logits = out.logits
    if logits.shape[:2] != (1, rows.numel()):
        raise ValueError(
            f"model returned logits {tuple(logits.shape)} for inputs {tuple(embeds.shape[:2])} and "
            f"logits_to_keep of {rows.numel()} rows; Channel-A needs a forward that honours logits_to_keep"
        )
    return logits


def _with_soft_coords(
    embeds: torch.Tensor,
    slots: torch.Tensor,
    coord_logits: torch.Tensor,
    coord_table: torch.Tensor,
    temperature: float,
    grad_mode: str,
) -> torch.Tensor:
    """`embeds` copied, rows `slots` set to Σ_k softmax(coord_logits/τ)_k · coord_table[k]; detached under em_detach."""
    import torch

    probs = torch.softmax(coord_logits.float() / temperature, dim=-1)
    soft = (probs.to(coord_table.dtype) @ coord_table).to(embeds.dtype)
    if grad_mode == "em_detach":
        soft = soft.detach()
    embeds = embeds.clone()
    embeds[0, slots] = soft
    return embeds


def softctx_logits(
    model: Any,
    batch: PackBatch,
    coord_token_ids: Sequence[int] | torch.Tensor,
    n_iter: int,
    temperature: float,
    grad_mode: str,
    model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `n_iter` teacher-forced passes with soft coordinate self-context; return (first, last) logits,
    each [1, K, V] at the K rows of `batch.logit_rows` (what `pack_loss` reads).

    Pass 0 embeds the ground-truth ids. Pass it > 0 rebuilds the same embeddings and replaces the rows
    at coord slots p (`batch.coord_pos`, label positions) with Σ_k softmax(z_prev[p−1, coord]/τ)_k · E[coord_k];
    every other row stays bitwise equal to the embedding of `input_ids`.

    Grad modes:
        unroll:    every pass under grad; the soft embeddings are not detached (backprop through the chain).
        em_detach: pass 0 (CE) and the last pass under grad, middle passes under no_grad, soft embeddings
                   detached. Under an outer `torch.no_grad()` nothing records a graph.

    Args:
        model: a causal LM whose forward accepts inputs_embeds/position_ids/use_cache and returns `.logits`.
        batch: the pack (on the model's device).
        coord_token_ids: 1000 token ids, entry k = bin k.
        n_iter: number of passes (1 = one plain teacher-forced forward; first is last).
        temperature: τ of the soft-context softmax (the geometry decode uses the same τ in losses.py).
        grad_mode: "unroll" | "em_detach".
        model_kwargs: extra forward kwargs passed to every pass (e.g. vision inputs; `pixel_values` go through
            the vision tower once, see `encode_images_once`).
    """
    import torch

    _check_args(n_iter, temperature, grad_mode)
    kwargs = encode_images_once(model, model_kwargs or {})
    embed = model.get_input_embeddings()
    slots = batch.coord_pos.to(batch.input_ids.device)
    rows = batch.logit_rows.to(batch.input_ids.device)
    slot_rows = torch.searchsorted(rows, slots - 1)  # the logits rows predicting the coord slots
    coord_ids = torch.as_tensor(coord_token_ids, dtype=torch.long, device=batch.input_ids.device)
    outer_grad = torch.is_grad_enabled()
    coord_table = None
    logits_first = logits_last = None
    prev_coord_logits = None  # [N, 1000] rows predicting coord slots; all we keep from a middle pass

    for it in range(n_iter):
        grad_on = outer_grad and (grad_mode == "unroll" or it == 0 or it == n_iter - 1)
        with torch.set_grad_enabled(grad_on):
            # Rebuilt every pass through the module itself, so embedding hooks (ZeRO-3 gather, PEFT) apply.
            embeds = embed(batch.input_ids)
            if it > 0 and slots.numel():
                if coord_table is None:  # [1000, H], gathered once per call
                    coord_table = embed(coord_ids[None])[0]
                embeds = _with_soft_coords(embeds, slots, prev_coord_logits, coord_table, temperature, grad_mode)
            logits = _forward(model, embeds, batch, rows, kwargs)
        if it == 0:
            logits_first = logits
        if it == n_iter - 1:
            logits_last = logits
        elif slots.numel():
            prev_coord_logits = logits[0].index_select(0, slot_rows).index_select(1, coord_ids)
        del logits  # middle passes keep only their [N, 1000] coord rows alive
    return logits_first, logits_last
