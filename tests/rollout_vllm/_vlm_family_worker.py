"""Subprocess body of test_vlm_families.py: one in-process vLLM engine of a Qwen2.5-VL / Qwen3-VL tiny
folder next to its HF learner, fp32 greedy ids compared before and after weight updates.

A separate process for the same reason as _colocate_worker.py (vLLM's in-process engine changes
process-wide state). argv: model dir, output JSON path, image paths. Writes a JSON report.
Updates: every weight; the vision tower only (blocks and patch embedding, not the aligner); and, where
the model has them (Qwen3-VL), the DeepStack mergers only.
"""

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from _shared import vllm_settings  # noqa: E402
from _vlm_families import load_hf  # noqa: E402
from _vlm_helpers import EOS, hf_greedy, perturb, settings, vlm_batch, weights_of  # noqa: E402

from toolkit.rollout import load_plan  # noqa: E402
from toolkit.rollout.backends.vllm_colocate import VLLMColocateBackend  # noqa: E402

VCFG = vllm_settings()
DEEPSTACK = "model.visual.deepstack_merger_list."


def snapshot(colo, learner, model_dir, prompts, images, step) -> dict:
    rollouts = colo.generate(prompts, step=step, images=images)
    return {
        "vllm": [r.completion_ids for r in rollouts],
        "hf": hf_greedy(learner, model_dir, prompts, images),
        "prompt_ids_equal": [r.prompt_ids == p for r, p in zip(rollouts, prompts)],
        "versions": [r.weight_version for r in rollouts],
    }


def plan_counts(worker) -> dict:
    """How the engine's weight loads went (toolkit/rollout/load_plan.py): recorded, replayed, left to vLLM."""
    plan = load_plan.plan_of(worker.model_runner.model)
    return {"recorded": plan.recorded, "replayed": plan.replayed, "unsupported": plan.unsupported}


def main(model_dir: str, out: str, paths: list[str]) -> None:
    prompts, images = vlm_batch(model_dir, paths)
    learner = load_hf(model_dir)
    names = [n for n, _ in learner.named_parameters()]
    colo = VLLMColocateBackend.create(
        model=model_dir, vllm=VCFG, settings=settings(2), model_dtype="float32", eos_id=EOS, weights=weights_of(learner)
    )  # runs the weight-name check
    report = {"prompts": prompts, "param_names": names}
    report["before"] = snapshot(colo, learner, model_dir, prompts, images, step=0)
    perturb(learner, seed=1)
    report["after_all"] = snapshot(colo, learner, model_dir, prompts, images, step=1)
    # the tower only: patch embedding and blocks (the aligner and DeepStack mergers untouched)
    for prefix, seed in (("model.visual.blocks.", 2), ("model.visual.patch_embed.", 3)):
        perturb(learner, seed=seed, prefix=prefix, scale=0.5)
    report["after_vision"] = snapshot(colo, learner, model_dir, prompts, images, step=2)
    if any(n.startswith(DEEPSTACK) for n in names):
        perturb(learner, seed=4, prefix=DEEPSTACK, scale=1.0)
        report["after_deepstack"] = snapshot(colo, learner, model_dir, prompts, images, step=3)
    report["plan"] = colo.llm.collective_rpc(plan_counts)[0]
    colo.close()
    with open(out, "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
