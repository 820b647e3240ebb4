"""Step budget: every rank gets E/W distinct samples per step, ranks are disjoint, order is a function of step."""
import pytest

from toolkit.trainer.budget import StepBudget


def budgets(n=50, e=8, p=1, w=2, seed=3):
    return [StepBudget(n, e, p, w, r, seed) for r in range(w)]


def test_gas_and_epoch_length():
    b = budgets()[0]
    assert b.gradient_accumulation_steps == 4
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
    b = StepBudget(40, 8, 2, 2, 1, 0)
    assert [len(m) for m in b.micro_batches(0)] == [2, 2]


@pytest.mark.parametrize("n,e,p,w", [(10, 10, 2, 2), (3, 4, 1, 1)])
def test_invalid_budgets_name_the_factors(n, e, p, w):
    with pytest.raises(ValueError, match="effective_batch_size"):
        StepBudget(n, e, p, w, 0, 0)
