"""Repeat-terminate rule: each trigger fires exactly at its threshold and not before."""

import random

import pytest

from toolkit.config.settings import RepeatSettings
from toolkit.rollout.repeat import RepeatWatch, should_stop

KEY = 7  # an id that opens an object key


def test_disabled_rule_is_none():
    assert RepeatSettings.from_section({"enabled": False, "max_object_keys": 3}) is None


def test_object_cap_allows_exactly_max_objects():
    rule = RepeatSettings(max_object_keys=2)
    assert not should_stop(rule, [KEY, 1, 2, KEY, 3], {KEY})
    assert should_stop(rule, [KEY, 1, 2, KEY, 3, KEY], {KEY})


def test_consecutive_repeats():
    rule = RepeatSettings(max_consecutive_token_repeats=3)
    assert not should_stop(rule, [1, 5, 5])
    assert should_stop(rule, [1, 5, 5, 5])


def test_ngram_repeats():
    rule = RepeatSettings(ngram_size=2, ngram_repeats=3)
    assert not should_stop(rule, [9, 1, 2, 1, 2])
    assert should_stop(rule, [9, 1, 2, 1, 2, 1, 2])
    assert not should_stop(rule, [1, 2, 1, 2, 2, 1])


def test_min_new_tokens_delays_every_trigger():
    rule = RepeatSettings(min_new_tokens=5, max_consecutive_token_repeats=2)
    assert not should_stop(rule, [4, 4, 4, 4])
    assert should_stop(rule, [4, 4, 4, 4, 4])


def test_from_cfg_reads_every_knob():
    rule = RepeatSettings.from_section(
        {
            "enabled": True,
            "min_new_tokens": 8,
            "max_consecutive_token_repeats": 8,
            "ngram_size": 8,
            "ngram_repeats": 3,
            "max_object_keys": 64,
        }
    )
    assert rule == RepeatSettings(8, 8, 8, 3, 64)


@pytest.mark.parametrize(
    "rule",
    [
        RepeatSettings(min_new_tokens=0, max_consecutive_token_repeats=3),
        RepeatSettings(min_new_tokens=5, ngram_size=2, ngram_repeats=3),
        RepeatSettings(min_new_tokens=2, max_object_keys=2),
        RepeatSettings(min_new_tokens=4, max_consecutive_token_repeats=4, ngram_size=3, ngram_repeats=2),
        RepeatSettings(),
    ],
)
def test_watch_equals_the_rule_on_every_prefix(rule):
    rng = random.Random(1)
    for _ in range(1500):
        generated = [rng.choice([3, 4, KEY, 9]) for _ in range(rng.randint(1, 40))]
        watch = RepeatWatch(rule, {KEY})
        got = [watch.push(t) for t in generated]
        assert got == [should_stop(rule, generated[:i], {KEY}) for i in range(1, len(generated) + 1)], generated
