"""Repeat-terminate rule: each trigger fires exactly at its threshold and not before."""
from toolkit.rollout.repeat import RepeatRule

KEY = 7  # an id that opens an object key


def test_disabled_rule_is_none():
    assert RepeatRule.from_cfg({"enabled": False, "max_object_keys": 3}) is None


def test_object_cap_allows_exactly_max_objects():
    rule = RepeatRule(max_object_keys=2)
    assert not rule.should_stop([KEY, 1, 2, KEY, 3], {KEY})
    assert rule.should_stop([KEY, 1, 2, KEY, 3, KEY], {KEY})


def test_consecutive_repeats():
    rule = RepeatRule(max_consecutive_token_repeats=3)
    assert not rule.should_stop([1, 5, 5])
    assert rule.should_stop([1, 5, 5, 5])


def test_ngram_repeats():
    rule = RepeatRule(ngram_size=2, ngram_repeats=3)
    assert not rule.should_stop([9, 1, 2, 1, 2])
    assert rule.should_stop([9, 1, 2, 1, 2, 1, 2])
    assert not rule.should_stop([1, 2, 1, 2, 2, 1])


def test_min_new_tokens_delays_every_trigger():
    rule = RepeatRule(min_new_tokens=5, max_consecutive_token_repeats=2)
    assert not rule.should_stop([4, 4, 4, 4])
    assert rule.should_stop([4, 4, 4, 4, 4])


def test_from_cfg_reads_every_knob():
    rule = RepeatRule.from_cfg({"enabled": True, "min_new_tokens": 8, "max_consecutive_token_repeats": 8,
                                "ngram_size": 8, "ngram_repeats": 3, "max_object_keys": 64})
    assert rule == RepeatRule(8, 8, 8, 3, 64)
