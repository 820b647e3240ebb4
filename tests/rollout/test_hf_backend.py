"""HF rollout backend on the committed tiny model: chunked left-padded decoding equals one-by-one
decoding, sampling is seeded per step without disturbing the trainer's RNG, repeat-terminate cuts rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _shared import greedy_settings

from toolkit.config.settings import DecodeSettings, RepeatSettings
from toolkit.rollout.backends.hf import HFBackend, RepeatTerminateProcessor

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(ROOT / "assets" / "tiny_qwen2", dtype=torch.float32)


def settings(dbs: int, sample: bool = False, repeat=None) -> DecodeSettings:
    return greedy_settings(max_new_tokens=12, decode_batch_size=dbs, seed=17, do_sample=sample, repeat=repeat)


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [20, 21, 22, 23], [30, 31]]


def test_chunked_left_padded_greedy_equals_one_by_one(model):
    batched = HFBackend(model, settings(2), pad_id=0, eos_id=3).generate(PROMPTS, step=0)
    single = [HFBackend(model, settings(1), pad_id=0, eos_id=3).generate([p], step=0)[0] for p in PROMPTS]
    assert [r.completion_ids for r in batched] == [r.completion_ids for r in single]
    assert [r.prompt_ids for r in batched] == PROMPTS
    assert all(r.finish_reason in ("stop", "length") for r in batched)


def test_sampling_is_seeded_per_step_and_restores_the_rng(model):
    backend = HFBackend(model, settings(2, sample=True), pad_id=0, eos_id=3)
    state = torch.get_rng_state()
    a = backend.generate(PROMPTS, step=4)
    assert torch.equal(torch.get_rng_state(), state)
    b = backend.generate(PROMPTS, step=4)
    c = backend.generate(PROMPTS, step=5)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]


def test_repeat_processor_forces_end_of_turn_only_on_tripped_rows():
    proc = RepeatTerminateProcessor(
        RepeatSettings(max_consecutive_token_repeats=2), key_ids=(), eos_id=3, prompt_width=2
    )
    ids = torch.tensor([[1, 2, 9, 9, 9], [1, 2, 9, 8, 9], [1, 2, 3, 0, 0]])  # row 2 finished, then padding
    scores = proc(ids, torch.zeros(3, 16))
    assert proc.cut == {0}
    assert scores[0].argmax().item() == 3 and torch.isinf(scores[0, 5])
    assert torch.equal(scores[1], torch.zeros(16)) and torch.equal(scores[2], torch.zeros(16))


def test_repeat_terminated_rollouts_report_it(model):
    """The random tiny model loops on tokens: the rule cuts every row right after its first repeat."""
    free = HFBackend(model, settings(2), pad_id=0, eos_id=3).generate(PROMPTS, step=0)
    cut = HFBackend(
        model, settings(2, repeat=RepeatSettings(max_consecutive_token_repeats=2)), pad_id=0, eos_id=3
    ).generate(PROMPTS, step=0)
    for f, c in zip(free, cut):
        first = next(i for i in range(1, len(f.completion_ids)) if f.completion_ids[i] == f.completion_ids[i - 1])
        assert c.finish_reason == "repeat"
        assert c.completion_ids == f.completion_ids[: first + 1] + [3]


@pytest.mark.parametrize("top_k", [-1, 7])
def test_sampling_uses_the_profiles_top_k_and_no_other(model, top_k):
    """top_k -1 samples from the whole vocabulary (as vLLM does): left unset, transformers would apply the
    checkpoint's or its own default top-k (50). The scores generate returns are those it sampled from."""
    from dataclasses import replace

    model.generation_config.top_k = 20  # what a Qwen checkpoint's generation_config.json sets
    try:
        backend = HFBackend(model, replace(settings(2, sample=True), top_k=top_k), pad_id=0, eos_id=3)
        ids = torch.tensor([PROMPTS[0]])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                output_scores=True,
                return_dict_in_generate=True,
                **backend._generate_kwargs(prompt_width=ids.shape[1]),
            )
    finally:
        model.generation_config.top_k = None
    finite = {int(torch.isfinite(s[0]).sum()) for s in out.scores}
    assert finite == ({model.config.vocab_size} if top_k == -1 else {top_k})
