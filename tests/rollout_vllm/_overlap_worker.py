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

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from _vllm_helpers import ENGINE_SETS, free_port  # noqa: E402
from toolkit.trainer import loop  # noqa: E402
from toolkit.trainer.engine import Stage2Engine  # noqa: E402

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier",
               "reduce_scatter", "reduce_scatter_tensor", "all_gather_into_tensor", "reduce", "gather")
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
    sets = [*ENGINE_SETS, "rollout_matching.vllm.mode=server", servers, f"rollout_matching.vllm.server.overlap={overlap}",
            f"model.model={args.model}", f"training.output_dir={out}", f"training.logging_dir={out}/tb",
            f"training.max_steps={STEPS}", "training.eval_strategy=no", "training.save_strategy=no",
            "rollout_matching.max_new_tokens=32", "rollout_matching.decode_batch_size=1", "global_max_length=512"]
    cfg = load_profile("smoke/b_only", tuple(sets), world_size=1)
    rounds, carried, calls = [], [], []

    def stream(*a, **kw):
        for segments in stream_channel_b(*a, **kw):
            rounds.append([[s.sample_id, list(s.input_ids), [float(w) for w in s.ce_weights]] for s in segments])
            yield segments

    def add(self, segments):
        packs = packer_add(self, segments)
        carried.append(len(self.buffer))
        return packs

    def backward_packs(self, packs, loss_fn, weights, *, last):
        calls.append({"packs": [p.input_ids[0].tolist() for p in packs], "weights": list(weights), "last": last})
        return engine_backward(self, packs, loss_fn, weights, last=last)

    loop.stream_channel_b, loop.RoundPacker.add, Stage2Engine.backward_packs = stream, add, backward_packs
    trainer = loop.Stage2Trainer(cfg)
    trainer.setup()
    try:
        assert trainer.stream_b, "the server backend must train Channel-B round by round"
        before = {k: v.detach().clone() for k, v in trainer.engine.full_state_dict().items()}
        metrics = [trainer.train_step(step) for step in range(STEPS)]
        params = {k: v.detach().clone() for k, v in trainer.engine.full_state_dict().items()}
        moved = max(float((params[k] - before[k]).abs().max()) for k in params)
    finally:
        trainer.backend.close()
    return {"rounds": rounds, "carried": carried, "calls": calls, "metrics": metrics, "params": params, "moved": moved}


stream_channel_b, packer_add, engine_backward = loop.stream_channel_b, loop.RoundPacker.add, Stage2Engine.backward_packs


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
    report = {"overlap": a, "serial": b, "collective_threads": sorted(threads),
              "params_max_abs": max(float((pa[k] - pb[k]).abs().max()) for k in pa), "params_keys_equal": pa.keys() == pb.keys()}
    with open(args.out, "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main()
