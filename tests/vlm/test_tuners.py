"""`model.tuner.train_type: lora | dora | full` on every tiny VLM family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Per family and tuner: every parameter lands in the intended optimizer group — language-model adapters
(LoRA A/B, DoRA magnitudes) at the main lr with the base LM frozen, the vision tower at `vit_lr`, the
aligner (merger, and Qwen3-VL's DeepStack mergers) at `aligner_lr` — and, for the adapters, a merged
export (`named_full_params` → `save_pretrained`) reloads with `from_pretrained` and gives the adapter
model's logits. Real peft, real models, CPU.
"""

import pytest
import torch
from _vlm_families import FAMILIES, family_dir, load_hf

from toolkit.trainer.export import apply_lora, named_full_params
from toolkit.trainer.optim import build_optimizer

LR, VIT_LR, ALIGNER_LR = 1e-4, 2e-5, 5e-5
GROUP_LR = {"llm": LR, "vit": VIT_LR, "aligner": ALIGNER_LR}


def wrap(model, train_type: str):
    if train_type == "full":
        return model
    # the predecessor's recipe: rank 16, alpha 32, all-linear, tower and aligner not frozen
    return apply_lora(model, 16, 32, 0.0, "all-linear", use_dora=train_type == "dora")


def expected_role(name: str) -> str:
    """The group a parameter must land in, written out per family's module names (not via param_role)."""
    if ".visual.merger." in name or ".visual.deepstack_merger_list." in name:
        return "aligner"
    return "vit" if ".visual." in name else "llm"


def groups_of(optimizer) -> dict[int, str]:
    return {id(p): g["name"].removesuffix("_no_decay") for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("train_type", ["lora", "dora", "full"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_parameter_lands_in_its_group(family, train_type):
    model = wrap(load_hf(family_dir(family)), train_type)
    opt = build_optimizer(model, lr=LR, vit_lr=VIT_LR, aligner_lr=ALIGNER_LR)
    placed = groups_of(opt)
    lr_of = {g["name"].removesuffix("_no_decay"): g["lr"] for g in opt.param_groups}
    assert lr_of == GROUP_LR
    counts = {"llm": 0, "vit": 0, "aligner": 0}
    for name, p in model.named_parameters():
        role = expected_role(name)
        if role == "llm" and train_type != "full":
            is_adapter = "lora_" in name  # lora_A / lora_B / (DoRA) lora_magnitude_vector
            assert p.requires_grad == is_adapter, name
            if not is_adapter:
                assert id(p) not in placed, f"{name}: a frozen base weight is in the optimizer"
                continue
        assert placed.get(id(p)) == role, f"{name}: in group {placed.get(id(p))}, expected {role}"
        counts[role] += 1
    names = [n for n, _ in model.named_parameters()]
    assert min(counts.values()) > 0, counts
    assert any("deepstack_merger_list" in n for n in names) == (family == "qwen3_vl")
    assert any("lora_magnitude_vector" in n for n in names) == (train_type == "dora")
    assert not any("lora_" in n and ".visual." in n for n in names), "no adapters on the tower or aligner"


def _inputs(model_dir):
    from PIL import Image

    from toolkit.vlm.inputs import VisionProcessor

    vision = VisionProcessor(model_dir)
    image = Image.new("RGB", (112, 112), (200, 40, 40))
    pixel_values, grid = vision.image_processor(images=[image], return_tensors="pt").values()
    ids = [1, 7, 1319] + [vision.pad_id] * vision.tokens_per_image(tuple(grid[0].tolist())) + [1320, 8, 9, 10]
    ids = torch.tensor([ids])
    return {
        "input_ids": ids,
        "mm_token_type_ids": (ids == vision.pad_id).long(),
        "pixel_values": pixel_values,
        "image_grid_thw": grid,
    }


@pytest.mark.parametrize("train_type", ["lora", "dora"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_merged_export_reloads_with_the_adapter_logits(family, train_type, tmp_path):
    model_dir = family_dir(family)
    model = wrap(load_hf(model_dir), train_type)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B (zero at init) and the DoRA magnitudes moved
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name or ".visual." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    inputs = _inputs(model_dir)
    with torch.no_grad():
        want = model(**inputs).logits
    state = dict(named_full_params(model, zero3=False))
    assert not any("lora_" in n or "base_layer" in n for n in state)
    model.get_base_model().save_pretrained(str(tmp_path), state_dict=state)
    reloaded = load_hf(tmp_path)
    with torch.no_grad():
        got = reloaded(**inputs).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    base = load_hf(model_dir)
    with torch.no_grad():
        assert not torch.allclose(base(**inputs).logits, want, atol=1e-3), "the adapters should change the logits"
