"""Split-step worker for tests/trainer/test_engine_split.py: one process per rank (torchrun), or a plain
process for world size 1. Rank 0 writes a JSON report to --out.

Per ZeRO stage, two engines from the same init run the same packs (the uneven plan of
_engine_worker.py): engine A in one `train_step` call per step, engine B split over three
`begin_step` / `backward_packs` / `end_step` calls with rank-dependent cuts — empty calls, a rank
whose packs all arrive in the last call, and a step whose last call is empty on every rank (the
forced padding round that carries the accumulation boundary).
"""

from __future__ import annotations

import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _engine_worker import N_RAW, build, loss_fn, max_abs, packs_for, tiny_model  # noqa: E402
from _torchrun import worker_parser, write_report  # noqa: E402

from toolkit.trainer import distributed  # noqa: E402

# CUTS[step][rank] = (a, b): calls get packs[:a], packs[a:b], packs[b:]; None = all in the first call.
CUTS = [{0: (1, None), 1: (0, 0)}, {0: None, 1: None}, {0: (0, 0), 1: (1, 1)}, {0: (0, 0), 1: (0, 0)}]


def split(packs: list, cut) -> list[list]:
    if cut is None:
        return [packs, [], []]
    a, b = cut[0], len(packs) if cut[1] is None else cut[1]
    return [packs[:a], packs[a:b], packs[b:]]


def weights(packs):
    return [p["n_segments"] / N_RAW for p in packs]


def run_engine(stage: str, world: int, rank: int, split_calls: bool) -> list[dict]:
    engine = build(tiny_model(seed=0), stage)
    rows = []
    for step in range(len(CUTS)):
        packs = packs_for(world, step, rank)
        if split_calls:
            engine.begin_step()
            calls = split(packs, CUTS[step][rank])
            for k, part in enumerate(calls):
                engine.backward_packs(part, loss_fn, weights(part), last=k == len(calls) - 1)
            res = engine.end_step()
        else:
            res = engine.train_step(packs, loss_fn, weights(packs))
        rows.append(
            {
                "loss": res.loss,
                "grad_norm": res.grad_norm,
                "n_packs": res.n_packs,
                "skipped": res.skipped,
                "n_padding": res.n_padding,
                "params": engine.full_state_dict(),
            }
        )
    del engine
    gc.collect()
    return rows


def compare(one: list[dict], split_rows: list[dict]) -> list[dict]:
    out = []
    for a, b in zip(one, split_rows):
        out.append(
            {
                "max_abs": max_abs(a["params"], b["params"]),
                "loss": [a["loss"], b["loss"]],
                "grad_norm": [a["grad_norm"], b["grad_norm"]],
                "n_packs": [a["n_packs"], b["n_packs"]],
                "skipped": [a["skipped"], b["skipped"]],
                "n_padding": [a["n_padding"], b["n_padding"]],
            }
        )
    return out


def main() -> None:
    args = worker_parser("0,2,3").parse_args()
    torch.set_num_threads(1)
    info = distributed.init_distributed()
    report = {"world": info.world_size, "stages": {}}
    moved = []
    for stage in args.stages.split(","):
        one = run_engine(stage, info.world_size, info.rank, split_calls=False)
        many = run_engine(stage, info.world_size, info.rank, split_calls=True)
        report["stages"][stage] = compare(one, many)
        moved.append(max_abs(one[0]["params"], one[-1]["params"]))
    report["params_moved"] = moved
    write_report(report, args.out, info.rank)
    distributed.close_distributed()


if __name__ == "__main__":
    main()
