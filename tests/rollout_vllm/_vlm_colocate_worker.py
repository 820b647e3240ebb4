"""Subprocess body of test_vlm_colocate.py: one in-process vLLM Qwen2-VL engine next to an HF learner.

A separate process for the same reason as _colocate_worker.py (vLLM's in-process engine changes
process-wide state). argv: model dir, output JSON path, image paths. Writes a JSON report.
"""

import copy
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/: _shared

from _shared import vllm_settings  # noqa: E402
from _vlm_helpers import EOS, hf_greedy, hf_learner, perturb, settings, vlm_batch, weights_of  # noqa: E402

from toolkit.rollout.backends.vllm_colocate import VLLMColocateBackend  # noqa: E402
from toolkit.vlm.images import open_image  # noqa: E402

VCFG = vllm_settings()


def snapshot(colo, learner, model_dir, prompts, images, step) -> dict:
    rollouts = colo.generate(prompts, step=step, images=images)
    return {
        "vllm": [r.completion_ids for r in rollouts],
        "hf": hf_greedy(learner, model_dir, prompts, images),
        "prompt_ids_equal": [r.prompt_ids == p for r, p in zip(rollouts, prompts)],
        "versions": [r.weight_version for r in rollouts],
    }


def double_expansion(colo, prompt, path) -> dict:
    """The learner's expanded prompt sent raw (not collapsed): vLLM expands its pads again."""
    from vllm import SamplingParams

    raw = colo.llm.generate(
        [{"prompt_token_ids": prompt, "multi_modal_data": {"image": open_image(path)}}],
        SamplingParams(max_tokens=1, temperature=0.0, detokenize=False),
        use_tqdm=False,
    )[0]
    return {"sent": len(prompt), "engine": len(raw.prompt_token_ids)}


def main(model_dir: str, out: str, paths: list[str]) -> None:
    prompts, images = vlm_batch(model_dir, paths)
    learner = hf_learner(model_dir)
    t0 = time.perf_counter()
    colo = VLLMColocateBackend.create(
        model=model_dir, vllm=VCFG, settings=settings(2), model_dtype="float32", eos_id=EOS, weights=weights_of(learner)
    )
    report = {"engine_start_s": time.perf_counter() - t0, "prompts": prompts}
    report["before"] = snapshot(colo, learner, model_dir, prompts, images, step=0)
    report["double"] = double_expansion(colo, prompts[0], paths[0])
    perturb(learner, seed=1)  # every weight, the vision tower included
    report["after_all"] = snapshot(colo, learner, model_dir, prompts, images, step=1)
    before_vision = copy.deepcopy(report["after_all"]["hf"])
    perturb(learner, seed=2, prefix="model.visual.", scale=0.5)  # only the vision tower: same images, new embeddings
    report["after_vision"] = snapshot(colo, learner, model_dir, prompts, images, step=2)
    report["vision_changed_hf"] = report["after_vision"]["hf"] != before_vision
    report["sync_s"] = colo.last_sync_s
    colo.close()
    with open(out, "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
