"""Typed settings (toolkit/config/settings.py) are built once from the resolved sections and agree with them."""

from dataclasses import FrozenInstanceError

import pytest

from toolkit.config import load_profile


def test_settings_mirror_the_resolved_sections():
    cfg = load_profile("prod/ab_mixed", world_size=2)
    s, rm = cfg.settings, cfg.rollout_matching
    assert s.rollout_backend == rm.rollout_backend == "vllm" and cfg.derived.server_mode
    assert s.decode.max_new_tokens == rm.max_new_tokens and s.decode.decode_batch_size == rm.decode_batch_size
    assert s.decode.seed == cfg.training.seed
    assert s.match.maskiou_gate == rm.maskiou_gate and s.match.candidate_top_k == rm.candidate_top_k
    assert s.packing.length == cfg.global_max_length and s.packing.buffer == cfg.training.packing_buffer
    assert [a.base_url for a in s.server.servers] == [x.base_url for x in rm.vllm.server.servers]
    assert s.server.infer_timeout_s == s.server.timeout_s  # null means "= timeout_s", resolved once
    assert s.sync.mode == cfg.derived.vllm_sync_mode
    assert s.vllm.max_num_seqs is None  # None stays None: vLLM's own default applies
    with pytest.raises(FrozenInstanceError):
        s.decode.max_new_tokens = 1


def test_greedy_decoding_ignores_temperature_and_repeat_guard_off():
    cfg = load_profile(
        "smoke/ab_mixed",
        overrides=[
            "rollout_matching.repeat_terminate.enabled=false",
            "rollout_matching.decoding.temperature=0.7",
            "rollout_matching.decode_mode=sample",
        ],
    )
    assert cfg.settings.decode.do_sample and cfg.settings.decode.temperature == 0.7
    assert cfg.settings.decode.repeat is None and cfg.settings.decode.max_object_keys is None
    assert not cfg.derived.server_mode
    greedy = load_profile("smoke/ab_mixed", overrides=["rollout_matching.decoding.temperature=0.0"]).settings.decode
    assert not greedy.do_sample and greedy.temperature == 1.0
