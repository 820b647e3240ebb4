"""Subprocess body of test_colocate.py: one in-process vLLM engine next to an HF learner.

A separate process because vLLM's in-process engine sets process-wide state (its parallel groups,
NUMA memory binding, a no-op torch.set_num_threads) that must not leak into the pytest process, and
only one engine fits in one process. Writes a JSON report to argv[2].
"""

import copy
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/: _shared

import torch  # noqa: E402
from _shared import greedy_settings, vllm_settings  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from toolkit.config.settings import DecodeSettings, RepeatSettings  # noqa: E402
from toolkit.rollout import load_plan  # noqa: E402
from toolkit.rollout.backends.hf import HFBackend  # noqa: E402
from toolkit.rollout.backends.vllm_colocate import VLLMColocateBackend  # noqa: E402
from toolkit.rollout.weight_sync import checkpoint_name  # noqa: E402

EOS, PAD = 2, 0
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 100, 200, 300, 400, 500], [1, 42], [1, 7, 7, 7, 7], [1, 3]]
VCFG = vllm_settings()


def settings(**kw) -> DecodeSettings:
    return greedy_settings(**{"max_new_tokens": 48, "decode_batch_size": 4, "seed": 7, **kw})


def ids(rollouts):
    return [r.completion_ids for r in rollouts]


def replay_check(colo, weights) -> dict:
    """The sync of step 1 replayed the copies recorded at step 0 (load_plan): the engine's parameters must
    equal what vLLM's own `load_weights` makes of the same tensors, bit for bit."""

    def state(worker) -> dict:
        return {n: p.detach().clone() for n, p in worker.model_runner.model.named_parameters()}

    def vllm_load(worker) -> None:
        worker.model_runner.model.load_weights((checkpoint_name(n), t) for n, t in weights("cpu"))

    def counts(worker) -> dict:
        plan = load_plan.plan_of(worker.model_runner.model)
        return {"recorded": plan.recorded, "replayed": plan.replayed, "unsupported": plan.unsupported}

    replayed = colo.llm.collective_rpc(state)[0]
    got = colo.llm.collective_rpc(counts)[0]
    colo.llm.collective_rpc(vllm_load)
    loaded = colo.llm.collective_rpc(state)[0]
    return {
        **got,
        "tensors": sum(1 for _ in weights("cpu")),
        "equal": sorted(replayed) == sorted(loaded) and all(torch.equal(replayed[n], loaded[n]) for n in loaded),
    }


def main(model_dir: str, out: str) -> None:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    learner = copy.deepcopy(hf)
    weights = lambda device: ((n, p.detach().to(device)) for n, p in learner.named_parameters())  # noqa: E731
    report = {}
    t0 = time.perf_counter()
    rng_before = torch.random.get_rng_state()
    colo = VLLMColocateBackend.create(
        model=model_dir, vllm=VCFG, settings=settings(), model_dtype="float32", eos_id=EOS, weights=weights
    )
    report["engine_start_s"] = time.perf_counter() - t0
    report["rng_untouched"] = bool(torch.equal(rng_before, torch.random.get_rng_state()))
    ref = HFBackend(learner, settings(), pad_id=PAD, eos_id=EOS)

    a, b = colo.generate(PROMPTS, step=0), ref.generate(PROMPTS, step=0)
    report["before"] = {
        "vllm": ids(a),
        "hf": ids(b),
        "vllm_finish": [r.finish_reason for r in a],
        "hf_finish": [r.finish_reason for r in b],
        "versions": [r.weight_version for r in a],
    }
    with torch.no_grad():  # the "optimizer step": perturb every learner weight
        g = torch.Generator().manual_seed(1)
        for _, p in learner.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    stale = colo.generate(PROMPTS[:2], step=0)  # same step: weights are NOT reloaded
    colo.sync_weights(1)
    report["sync_s"] = colo.last_sync_s
    report["replay"] = replay_check(colo, weights)
    a, b = colo.generate(PROMPTS, step=1), ref.generate(PROMPTS, step=1)
    report["after"] = {
        "vllm": ids(a),
        "hf": ids(b),
        "vllm_finish": [r.finish_reason for r in a],
        "hf_finish": [r.finish_reason for r in b],
        "versions": [r.weight_version for r in a],
        "stale_same_step": ids(stale) == report["before"]["vllm"][:2],
    }
    # Repeat-terminate cut post hoc on vLLM, in the processor on HF: the same ids.
    rule = RepeatSettings(min_new_tokens=4, max_consecutive_token_repeats=3, ngram_size=2, ngram_repeats=3)
    colo.s, ref.s = settings(repeat=rule), settings(repeat=rule)
    a, b = colo.generate(PROMPTS, step=1), ref.generate(PROMPTS, step=1)
    report["repeat"] = {
        "vllm": ids(a),
        "hf": ids(b),
        "vllm_finish": [r.finish_reason for r in a],
        "hf_finish": [r.finish_reason for r in b],
    }
    # Seeded sampling: reproducible per step, different across steps.
    colo.s = settings(do_sample=True, temperature=1.0)
    s1, s1b, s2 = (ids(colo.generate(PROMPTS, step=st)) for st in (1, 1, 2))
    report["sampled"] = {"same_step_equal": s1 == s1b, "steps_differ": s1 != s2}
    colo.close()
    with open(out, "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
