"""Channel scheduler: Bresenham sequence, exact counts, float robustness."""

from math import floor

import pytest

from toolkit.trainer.scheduler import channel_for_step, realized_b_ratio


def _seq(b, n):
    return [channel_for_step(s, b) for s in range(n)]


def test_half_alternates_starting_with_a():
    assert _seq(0.5, 8) == ["A", "B"] * 4


def test_five_percent_gives_one_b_at_step_19():
    seq = _seq(0.05, 20)
    assert seq.count("B") == 1
    assert seq[19] == "B"
    assert set(seq[:19]) == {"A"}


@pytest.mark.parametrize("b", [0.001, 0.01, 0.05, 0.1, 0.15, 0.2, 0.29, 0.3, 0.333, 0.57, 0.7, 0.85, 0.999])
def test_thousand_steps_hold_exactly_round_1000b(b):
    assert _seq(b, 1000).count("B") == round(1000 * b)


@pytest.mark.parametrize("b", [0.07, 0.29, 0.57, 0.58, 0.85])
def test_every_prefix_count_is_exact(b):
    # The number of B steps among the first n steps is floor(n·b) computed in exact decimal arithmetic.
    from fractions import Fraction

    exact = Fraction(str(b))
    count = 0
    for n in range(1, 400):
        count += channel_for_step(n - 1, b) == "B"
        assert count == floor(n * exact)


def test_float_error_would_move_a_b_step():
    # Guard that exactness matters: naive float math misplaces B steps for b=0.29 (100·0.29 = 28.999…).
    b = 0.29
    naive = ["B" if floor((s + 1) * b) > floor(s * b) else "A" for s in range(1000)]
    assert naive != _seq(b, 1000)


@pytest.mark.parametrize("b,expected", [(0.0, "A"), (-0.3, "A"), (1.0, "B"), (1.7, "B")])
def test_bounds(b, expected):
    assert set(_seq(b, 50)) == {expected}


def test_invalid_inputs():
    with pytest.raises(ValueError, match="step"):
        channel_for_step(-1, 0.5)
    with pytest.raises(ValueError, match="finite"):
        channel_for_step(3, float("nan"))


def test_realized_ratio():
    assert realized_b_ratio([]) == 0.0
    assert realized_b_ratio(_seq(0.05, 20)) == pytest.approx(0.05)
    assert realized_b_ratio(iter(["A", "B", "B", "A"])) == 0.5
    with pytest.raises(ValueError, match="channel"):
        realized_b_ratio(["A", "C"])


def test_b_ratio_realized_is_cumulative_not_a_200_step_window():
    """Differs from the predecessor (mean over the last 200 steps): the trainer logs B steps so far / steps
    so far. With b = 0.3 after 201 steps that is 60/201, where a 200-step window would give 60/200."""
    from types import SimpleNamespace

    from toolkit.trainer.engine import StepResult
    from toolkit.trainer.loop import Stage2Trainer
    from toolkit.trainer.metrics import StepMetrics

    b = 0.3
    state = SimpleNamespace(b_steps=0)
    learner = SimpleNamespace(add_metrics=lambda m, res, packs: None)  # the learner's own metrics: not the point
    trainer = SimpleNamespace(state=state, budget=SimpleNamespace(epoch_of=lambda s: 0.0), learner=learner)
    res = StepResult(loss=0.0, grad_norm=0.0, lr=0.0, lrs={}, n_packs=0, n_padding=0, n_packs_max=0)
    for step in range(201):
        channel = channel_for_step(step, b)
        state.b_steps += channel == "B"  # as Stage2Trainer.train_step counts them
        m = StepMetrics()
        Stage2Trainer._step_metrics(trainer, m, res, [], channel, step, n_raw=1, n_segments=1)
    assert state.b_steps == 60
    assert m.finalize()["stage2_ab/b_ratio_realized"] == pytest.approx(60 / 201, rel=1e-12)
