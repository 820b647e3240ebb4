"""The backend protocol's round stream: a backend that decodes a step in one call (hf, vLLM colocate) hands it
over as one round through OneRoundChunks — weights synced for the step first, every prompt, in order."""

from __future__ import annotations

from toolkit.rollout.backends.base import OneRoundChunks, Rollout
from toolkit.rollout.backends.hf import HFBackend
from toolkit.rollout.backends.vllm_colocate import VLLMColocateBackend


class Recording(OneRoundChunks):
    def __init__(self):
        self.calls = []

    def sync_weights(self, step):
        self.calls.append(("sync", step))

    def generate(self, prompts, *, step, images=None):
        self.calls.append(("generate", step, images))
        return [Rollout(list(p), [len(p), 2], "stop") for p in prompts]


def test_one_round_holds_every_prompt_after_the_weight_sync():
    backend = Recording()
    prompts, images = [[1, 2], [3], [4, 5, 6]], [("a.png",), (), ("b.png", "c.png")]
    stream = backend.generate_chunks(prompts, step=7, background=True, images=images)
    assert backend.calls == [("sync", 7), ("generate", 7, images)]  # decoded before the stream is handed over
    rounds = list(stream)
    stream.close()
    assert [idx for idx, _ in rounds] == [[0, 1, 2]]
    assert [r.prompt_ids for r in rounds[0][1]] == prompts and stream.wait_s >= 0.0


def test_an_empty_step_is_one_empty_round():
    assert [idx for idx, _ in Recording().generate_chunks([], step=0)] == [[]]


def test_the_one_call_backends_declare_the_default():
    assert issubclass(HFBackend, OneRoundChunks) and issubclass(VLLMColocateBackend, OneRoundChunks)
