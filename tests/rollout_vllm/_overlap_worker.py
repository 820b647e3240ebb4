"""Subprocess body of test_overlap.py: the real trainer (DeepSpeed ZeRO-2, one CPU rank) runs the same two
Channel-B steps against the session's rollout server with `vllm.server.overlap` true and then false.

A separate process because the trainer's engine sets up torch.distributed in its process. Recording
spies wrap (never replace) the step's round stream, RoundPacker.add, Stage2Engine.backward_packs and
every torch.distributed collective (which thread called it). Writes a JSON report to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/: _shared

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _shared import free_port  # noqa: E402
from _vllm_helpers import ENGINE_SETS  # noqa: E402
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402

from toolkit.trainer import loop, packing  # noqa: E402
from toolkit.trainer.engine import Stage2Engine  # noqa: E402

COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_object",
    "broadcast_object_list",
    "barrier",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_gather_into_tensor",
    "reduce",
    "gather",
)
STEPS = 2


def spy_collectives(threads: set) -> None:
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        @functools.wraps(fn)
        def wrapper(*a, __fn=fn, **kw):
            threads.add(threading.current_thread().name)
            return __fn(*a, **kw)

        setattr(dist, name, wrapper)


def run(args, overlap: bool) -> dict:
    from toolkit.config import load_profile

    out = os.path.join(args.tmp, f"run_overlap_{overlap}")
    servers = f'rollout_matching.vllm.server.servers=[{{base_url: "{args.url}", group_port: {free_port()}}}]'
    sets = [
        *ENGINE_SETS,
        "rollout_matching.vllm.mode=server",
        servers,
        f"rollout_matching.vllm.server.overlap={overlap}",
        f"model.model={args.model}",
        f"training.output_dir={out}",
        f"training.logging_dir={out}/tb",
        f"training.max_steps={STEPS}",
        "training.eval_strategy=no",
        "training.save_strategy=no",
        "rollout_matching.max_new_tokens=32",
        "rollout_matching.decode_batch_size=1",
        "global_max_length=512",
    ]
    cfg = load_profile("smoke/b_only", tuple(sets), world_size=1)
    rounds, carried, calls = [], [], []

    def stream(*a, **kw):
        for segments, last in channel_b_rounds(*a, **kw):
            rounds.append([[s.sample_id, list(s.input_ids), [float(w) for w in s.ce_weights]] for s in segments])
            yield segments, last

    def add(self, segments, last=False):
        packs = packer_add(self, segments, last=last)
        carried.append(len(self.buffer))
        return packs

    def backward_packs(self, packs, loss_fn, weights, *, last):
        probe = next(iter(self.module.parameters()))
        before = float(probe.detach().double().sum())
        calls.append(
            {
                "packs": [p.input_ids[0].tolist() for p in packs],
                "weights": list(weights),
                "last": last,
                "optimizer_steps_before": optimizer_steps[0],
            }
        )
        out = engine_backward(self, packs, loss_fn, weights, last=last)
        calls[-1]["params_unchanged"] = float(probe.detach().double().sum()) == before
        return out

    def ds_step(self, *a, **kw):
        optimizer_steps[0] += 1
        return deepspeed_step(self, *a, **kw)

    optimizer_steps = [0]
    loop.channel_b_rounds, packing.RoundPacker.add, Stage2Engine.backward_packs = stream, add, backward_packs
    DeepSpeedEngine.step = ds_step
    trainer = loop.Stage2Trainer(cfg)
    trainer.setup()
    try:
        assert trainer.backend.chunk < len(trainer.budget.step_indices(0)), "the step must take several rounds"
        before = {k: v.detach().clone() for k, v in trainer.engine.full_state_dict().items()}
        metrics = [trainer.train_step(step) for step in range(STEPS)]
        params = {k: v.detach().clone() for k, v in trainer.engine.full_state_dict().items()}
        moved = max(float((params[k] - before[k]).abs().max()) for k in params)
        sync = after_training_sync(args, trainer, params) if overlap else None
    finally:
        trainer.backend.close()
    return {
        "rounds": rounds,
        "carried": carried,
        "calls": calls,
        "metrics": metrics,
        "params": params,
        "moved": moved,
        "optimizer_steps": optimizer_steps[0],
        "sync": sync,
    }


PROBE = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 100, 200, 300, 400, 500], [1, 42]]


def after_training_sync(args, trainer, trained: dict) -> dict:
    """The learner's weights are moved well away from the trained ones (so greedy output changes), then the
    trainer's own backend decodes at step STEPS, which first pushes them (version STEPS + 1) through its
    weight-sync path. Reported: the server's /info/ version, the rollouts' versions, and the reference —
    greedy decoding by an HF copy holding the learner's current weights (and the trained ones, to show
    that the prompts tell the two apart)."""
    import requests
    from transformers import AutoModelForCausalLM

    from toolkit.rollout.backends.hf import HFBackend

    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in trainer.engine.module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    current = {k: v.detach().clone() for k, v in trainer.engine.full_state_dict().items()}
    served = trainer.backend.generate(PROBE, step=STEPS)
    info = requests.get(args.url + "/info/", timeout=30).json()

    def greedy(state: dict) -> list:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        model.load_state_dict(state)
        ref = HFBackend(
            model,
            trainer.backend.s,
            pad_id=trainer.tok.pad_token_id,
            eos_id=trainer.codec.im_end_id,
            object_key_ids=trainer.codec.object_key_token_ids(),
        )
        return [r.completion_ids for r in ref.generate(PROBE, step=STEPS)]

    return {
        "server_version": info["weight_version"],
        "rollout_versions": sorted({r.weight_version for r in served}),
        "served": [r.completion_ids for r in served],
        "reference": greedy(current),
        "trained": greedy(trained),
        "greedy": trainer.backend.s.do_sample is False,
    }


channel_b_rounds, packer_add = loop.channel_b_rounds, packing.RoundPacker.add
engine_backward = Stage2Engine.backward_packs
deepspeed_step = DeepSpeedEngine.step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tmp", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    threads: set = set()
    spy_collectives(threads)
    a = run(args, overlap=True)
    b = run(args, overlap=False)
    pa, pb = a.pop("params"), b.pop("params")
    report = {
        "overlap": a,
        "serial": b,
        "collective_threads": sorted(threads),
        "params_max_abs": max(float((pa[k] - pb[k]).abs().max()) for k in pa),
        "params_keys_equal": pa.keys() == pb.keys(),
    }
    with open(args.out, "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main()
