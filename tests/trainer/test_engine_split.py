"""An optimizer step split over several `backward_packs` calls equals the same step in one `train_step`.

Real DeepSpeed on CPU (gloo), ZeRO 0 (boundary), 2 (coalesced reduction) and 3 (boundary, partitioned
parameters), 1 rank and 2 ranks under torchrun (`_split_worker.py`). The cuts cover empty calls, a
rank whose packs all come in the last call, and a last call that is empty on every rank.
"""

from pathlib import Path

import pytest
from _torchrun import run_worker

WORKER = Path(__file__).with_name("_split_worker.py")
TOL = 1e-6


@pytest.mark.parametrize("world", [pytest.param(1, id="world1"), pytest.param(2, id="world2", marks=pytest.mark.dist)])
def test_split_step_equals_one_call(world, tmp_path):
    report = run_worker(WORKER, [], world, tmp_path, 400, "split")
    assert report["world"] == world and set(report["stages"]) == {"0", "2", "3"}
    assert min(report["params_moved"]) > 1e-3  # the steps really train, so equal params mean something
    for stage, rows in report["stages"].items():
        assert len(rows) == 4
        for step, row in enumerate(rows):
            where = f"ZeRO-{stage} step {step}: {row}"
            assert row["max_abs"] <= TOL, where
            assert row["loss"][0] == pytest.approx(row["loss"][1], abs=1e-7), where
            assert row["n_packs"][0] == row["n_packs"][1] and row["skipped"][0] == row["skipped"][1], where
            if row["grad_norm"][0] is not None:
                assert row["grad_norm"][0] == pytest.approx(row["grad_norm"][1], rel=1e-6), where
        assert rows[-1]["skipped"] == [True, True]
        if stage != "2":  # step 1 ends with a call empty on every rank: a padding round carries the boundary
            assert rows[1]["n_padding"][1] == rows[1]["n_padding"][0] + 1
