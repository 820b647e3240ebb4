"""Step budget: every rank gets E/W distinct samples per step, ranks are disjoint, order is a function of step."""

import pytest

from toolkit.config import load_profile
from toolkit.trainer.budget import StepBudget


def budget(n, e, p, w, rank, seed):
    """The budget of E, P, W as `derive` splits them: GAS = E / (P·W), E / W per rank."""
    return StepBudget(n, e // (p * w), e // w, w, rank, seed)


def budgets(n=50, e=8, p=1, w=2, seed=3):
    return [budget(n, e, p, w, r, seed) for r in range(w)]


def test_gas_and_epoch_length():
    b = budgets()[0]
    assert b.gradient_accumulation_steps == 4 and b.per_device_batch_size == 1 and b.effective_batch_size == 8
    assert b.steps_per_epoch == 6  # 50 // 8: the 2-sample tail is dropped


def test_ranks_take_disjoint_equal_shares_of_the_step_window():
    for step in range(13):
        shares = [b.step_indices(step) for b in budgets()]
        assert [len(s) for s in shares] == [4, 4]
        assert not set(shares[0]) & set(shares[1])


def test_one_epoch_covers_distinct_records_and_drops_the_tail():
    seen = [i for step in range(6) for b in budgets() for i in b.step_indices(step)]
    assert len(seen) == len(set(seen)) == 48


def test_order_is_a_pure_function_of_step_and_epochs_reshuffle():
    a, b = budgets()[0], budgets()[0]
    assert a.micro_batches(7) == b.micro_batches(7)
    assert a.step_indices(0) != a.step_indices(6)  # epoch 1 uses another permutation


def test_micro_batches_have_per_device_size():
    b = budget(40, 8, 2, 2, 1, 0)
    assert [len(m) for m in b.micro_batches(0)] == [2, 2]


def test_fewer_records_than_one_step_is_refused():
    with pytest.raises(ValueError, match="3 records, fewer than one step's effective_batch_size=4"):
        budget(3, 4, 1, 1, 0, 0)


def test_budget_takes_the_derived_split_and_checks_the_world_size():
    cfg = load_profile("smoke/ab_mixed", world_size=2)
    b = StepBudget.from_config(cfg, 100, world_size=2, rank=1)
    d = cfg.derived
    assert (b.gradient_accumulation_steps, b.per_rank_samples) == (
        d.gradient_accumulation_steps,
        d.per_rank_samples_per_step,
    )
    assert b.effective_batch_size == cfg.training.effective_batch_size
    assert b.per_device_batch_size == cfg.training.per_device_train_batch_size
    with pytest.raises(ValueError, match="resolved for learner_world_size=2, but this run has 4 learner ranks"):
        StepBudget.from_config(cfg, 100, world_size=4, rank=0)
