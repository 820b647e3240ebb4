"""The real Channel-A and Channel-B losses through the engine equal plain PyTorch on ZeRO 0-3, 1 and 2 ranks.

Real segments (val records, the committed tokenizer, synthetic rollouts through parse → match → FN-append
for Channel-B; canonical answers for Channel-A), packed with `plan_packs` / `collate_pack` so ranks hold
different pack counts, weighted n_segments / N_raw_local, and the trainer's losses (`pack_loss`, with
`softctx_logits` for Channel-A at n_softctx_iter 1, 2 and 3, grad modes unroll and em_detach). Each row
is one optimizer step from the same initial state. `_channel_worker.py` runs as a plain process (world 1)
and under torchrun with 2 CPU ranks (`dist`); rank 0 writes one JSON report. Run with `-s` for the table.
"""
from pathlib import Path

import pytest

from _torchrun import run_worker

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_channel_worker.py")
STAGES = ("0", "1", "2", "3")
TOL = 1e-6
TIMEOUT_S = 300
WORLDS = [pytest.param(1, id="world1"), pytest.param(2, id="world2", marks=pytest.mark.dist)]



def _run_worker(world: int, tmp: Path) -> dict:
    return run_worker(WORKER, ["--stages", ",".join(STAGES)], world, tmp, TIMEOUT_S, "channel")


@pytest.fixture(scope="module")
def report_w1(tmp_path_factory):
    return _run_worker(1, tmp_path_factory.mktemp("channel_w1"))


@pytest.fixture(scope="module")
def report_w2(tmp_path_factory):
    return _run_worker(2, tmp_path_factory.mktemp("channel_w2"))


def _report(request, world: int) -> dict:
    return request.getfixturevalue(f"report_w{world}")


def _label(step) -> str:
    channel, n_iter, mode = step
    return "B" if channel == "B" else f"A n{n_iter} {mode}"


# ---- the samples themselves (no engine) --------------------------------------------------------------
def test_plan_is_uneven_and_channel_b_covers_match_fp_fn_and_drops():
    """Guards the fixture data: uneven pack counts (a rank with none), every Channel-B target case occurs."""
    import _channel_worker as w

    assert w.plan_counts(2) == [[3, 1], [1, 3], [3, 1], [2, 3], [3, 1], [1, 3], [3, 0]]
    b_steps = [s for s, (channel, _, _) in enumerate(w.STEPS) if channel == "B"]
    meta: dict = {}
    for step in b_steps:
        for rank in range(2):
            for key, value in w.packs_for(step, rank)[2].items():
                meta[key] = meta.get(key, 0) + value
    for key in ("rollout/matched", "rollout/fp", "rollout/fn_appended", "rollout/parse_dropped_invalid",
                "rollout/parse_truncated", "rollout/invalid_rollout", "stage2/struct_ce_multiplied",
                "stage2/drop/too_long"):
        assert meta.get(key, 0) > 0, (key, meta)
    groups = {int(g) for step in b_steps for rank in range(2) for p in w.packs_for(step, rank)[0]
              for g in p.box_group.tolist()}
    assert groups == {0, 1}  # matched-prefix and FN-appended boxes both get geometry
    modes = {(n, m) for c, n, m in w.STEPS if c == "A"}
    assert {(1, "unroll"), (1, "em_detach"), (2, "unroll"), (2, "em_detach")} <= modes
    for step in range(len(w.STEPS)):  # every rank holds N_RAW raw samples; drops stay in the denominator
        for rank in range(2):
            packs, weights, _ = w.packs_for(step, rank)
            assert len(w.SAMPLES[step][rank]) == w.N_RAW
            assert weights == [p.n_segments / w.N_RAW for p in packs]


# ---- the engine in real processes ----------------------------------------------------------------
@pytest.mark.parametrize("world", WORLDS)
def test_real_losses_equal_plain_pytorch(request, world):
    """Headline: after one step of each channel / soft-context variant, params equal the reference."""
    report = _report(request, world)
    steps = report["steps"]
    lines = [f"world {world} ({report['job_s']} s): max |Δ| vs plain PyTorch, one step from the same init",
             f"  {'':10}" + "".join(f"{_label(s):>17}" for s in steps),
             f"  {'packs':10}" + "".join(f"{':'.join(map(str, c)):>17}" for c in report["plan_counts"]),
             f"  {'wrong w':10}" + "".join(f"{x:>17.1e}" for x in report["sensitivity"])]
    for stage in STAGES:
        rows = report["stages"][stage]["steps"]
        lines.append(f"  ZeRO-{stage:<5}" + "".join(f"{r['max_abs']:>17.1e}" for r in rows))
    lines.append("  Channel-A variant effect on the reference: "
                 + ", ".join(f"{k} {v:.1e}" for k, v in report["variant_effect"].items()))
    print("\n".join(lines))
    assert min(report["variant_effect"].values()) > 100 * TOL, report["variant_effect"]
    for step, counts in enumerate(report["plan_counts"]):
        if max(counts) > 1:  # with one pack per rank a per-pack mean is the same weighting
            assert report["sensitivity"][step] > 100 * TOL, ("cannot tell a wrong weighting apart", step)
    for stage in STAGES:
        for step, row in enumerate(report["stages"][stage]["steps"]):
            where = (stage, _label(steps[step]), row)
            assert not row["skipped"], where
            assert row["max_abs"] <= TOL, where
            assert row["lr"] == pytest.approx(row["ref_lr"], rel=1e-12), where
            assert row["grad_norm"] == pytest.approx(row["ref_grad_norm"], rel=1e-5), where


@pytest.mark.parametrize("world", WORLDS)
def test_every_rank_reports_its_own_weighted_loss_and_pack_counts(request, world):
    report = _report(request, world)
    for stage in STAGES:
        all_ranks = report["stages"][stage]["all_ranks"]
        for step, ref_row in enumerate(report["stages"][stage]["steps"]):
            counts = report["plan_counts"][step]
            for rank in range(world):
                got = all_ranks[rank][step]
                assert got["loss"] == pytest.approx(ref_row["ref_rank_losses"][rank], rel=1e-6, abs=1e-6), \
                    (stage, step, rank)
                assert (got["n_packs"], got["n_packs_max"]) == (counts[rank], max(counts)), (stage, step, rank)
                assert got["n_padding"] == max(counts) - counts[rank]
