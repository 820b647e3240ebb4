"""load_plan: vLLM's `load_weights` recorded once per name, then replayed as copies.

The models here are small torch modules whose `load_weights` follows vLLM's loader patterns (stacked
q/k/v rows written through `narrow(...).copy_`, vocabulary padding zeroed with `fill_`, names skipped);
the real Qwen2 loader in vLLM is covered by tests/rollout_vllm/test_colocate.py (replayed weights equal
vLLM's own load bit for bit) and test_server.py (greedy rollouts after a replayed sync equal HF's).
Every load is compared with a twin module loaded by its own loader only.
"""

import pytest
import torch

from toolkit.rollout import load_plan
from toolkit.rollout.weight_sync import pack_bucket, unpack_bucket

ROWS = {"q": 0, "k": 4, "v": 8}


class Stacked(torch.nn.Module):
    """q/k/v into one stacked parameter, a padded embedding, an o projection in bf16, a column shard, a skipped
    name."""

    def __init__(self, mode: str = "copy"):
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.zeros(12, 4), requires_grad=False)
        self.embed = torch.nn.Parameter(torch.full((6, 4), 7.0), requires_grad=False)  # 5 rows + 1 padding
        self.o = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16), requires_grad=False)
        self.down = torch.nn.Parameter(torch.zeros(4, 2), requires_grad=False)  # columns 2:4 (a TP shard)
        self.mode = mode
        self.calls = 0

    def load_weights(self, weights):
        self.calls += 1
        for name, w in weights:
            if name in ROWS:
                self.qkv.data.narrow(0, ROWS[name], 4).copy_(w)
            elif name == "embed":
                self.embed.data[: w.shape[0]].copy_(w)
                self.embed.data[w.shape[0] :].fill_(0)
            elif name == "o":
                if self.mode == "convert":
                    w = w.to(torch.float64)  # a temporary between the incoming tensor and the parameter
                self.o.data.copy_(w)
                if self.mode == "scale":
                    self.o.data.mul_(2)
            elif name == "down":
                self.down.data.copy_(w.narrow(1, 2, 2))  # a strided view of the incoming tensor
            # "rotary.inv_freq": skipped, as vLLM skips it


def weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    named = [(n, torch.randn(4, 4, generator=g)) for n in ("q", "k", "v", "o", "down")]
    return [*named, ("embed", torch.randn(5, 4, generator=g)), ("rotary.inv_freq", torch.randn(2, generator=g))]


def as_bucket(named):
    """The server's path: every tensor a view into one flat uint8 buffer."""
    flat, specs = pack_bucket(named)
    return unpack_bucket(flat, specs)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("bucketed", [False, True], ids=["tensors", "bucket"])
def test_replay_equals_the_loader_and_skips_it(bucketed):
    model, twin = Stacked(), Stacked()
    for seed in range(4):
        named = weights(seed)
        assert load_plan.load_weights(model, as_bucket(named) if bucketed else named) == len(named)
        twin.load_weights(named)
        assert same_state(model, twin), f"load {seed}"
    plan = load_plan.plan_of(model)
    assert model.calls == 1, "after the recording load, no load should reach the model's own loader"
    assert (plan.recorded, plan.replayed, plan.unsupported) == (7, 21, 0)
    assert plan.entries["rotary.inv_freq"].writes == ()  # skipped by the loader, so nothing to replay


@pytest.mark.parametrize("mode", ["convert", "scale"])
def test_what_cannot_be_replayed_stays_with_the_loader(mode):
    model, twin = Stacked(mode), Stacked(mode)
    for seed in range(3):
        load_plan.load_weights(model, weights(seed))
        twin.load_weights(weights(seed))
        assert same_state(model, twin), f"load {seed}"
    plan = load_plan.plan_of(model)
    assert plan.replayed == 0 and plan.unsupported == 21
    assert model.calls == 3


def test_a_replaced_parameter_is_recorded_again():
    model, twin = Stacked(), Stacked()
    load_plan.load_weights(model, weights(0))
    old = model.qkv
    model.qkv = torch.nn.Parameter(torch.zeros(12, 4), requires_grad=False)  # as a re-allocating engine would
    load_plan.load_weights(model, weights(1))
    twin.load_weights(weights(1))
    assert same_state(model, twin) and not torch.equal(old, model.qkv)
    assert load_plan.plan_of(model).recorded == 7 + 3  # q, k, v: their target changed


def test_a_different_incoming_layout_is_recorded_again():
    model, twin = Stacked(), Stacked()
    load_plan.load_weights(model, weights(0))
    named = [(n, t.t().contiguous().t() if n == "q" else t) for n, t in weights(1)]  # q arrives transposed
    load_plan.load_weights(model, named)
    twin.load_weights(named)
    assert same_state(model, twin)
    assert load_plan.plan_of(model).recorded == 8 and model.calls == 2
