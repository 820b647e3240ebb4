"""One run, one folder, one step numbering — through the public entry point (`python -m toolkit.train`).

A second fresh run into a used folder refuses with the fix; --overwrite moves the old run aside;
--resume auto refuses another config and extends a finished run on the stretched schedule (lr > 0).
"""

from __future__ import annotations

import json

import pytest
from _e2e_runs import run_train
from _shared import metrics, tiny_model_dir

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("assets"))


def _sets(tiny, *extra):
    return (f"model.model={tiny}", "training.eval_strategy=no", "training.save_steps=1", *extra)


def test_a_run_owns_its_folder_and_extending_it_continues_the_schedule(tiny, tmp_path):
    from toolkit.trainer.optim import lr_lambda

    out = tmp_path / "run"
    first = run_train("smoke/a_only", out, *_sets(tiny, "training.max_steps=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert (out / "resolved_config.yaml").read_text().startswith("# resolved from: ")
    # checkpoint lines name the real DeepSpeed tag and say plainly that nothing was evaluated
    assert f"saved DeepSpeed checkpoint {out}/checkpoints/step-000002/ds/global_step2" in first.stderr
    assert f"checkpoint written: {out}/checkpoints/step-000002 (no rollout/f1 measured yet)" in first.stderr
    assert "None" not in "".join(line for line in first.stderr.splitlines() if "checkpoint written" in line)

    again = run_train("smoke/a_only", out, *_sets(tiny, "training.max_steps=2"))
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert "already holds another run" in again.stderr and "--resume auto" in again.stderr
    assert "--overwrite" in again.stderr and [r["step"] for r in metrics(out)] == [1, 2]

    other = run_train(
        "smoke/a_only", out, *_sets(tiny, "training.max_steps=4", "training.learning_rate=3e-4"), resume="auto"
    )
    assert other.returncode == 1 and "training.learning_rate: 0.0001 → 0.0003" in other.stderr, other.stderr[-2000:]
    assert "Traceback" not in other.stderr

    longer = run_train("smoke/a_only", out, *_sets(tiny, "training.max_steps=4"), resume="auto")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resume: training.max_steps changed 2 → 4" in longer.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # The finished 2-step cosine run ended at lr 0; extended to 4 steps, step 3 runs at the 4-step schedule's lr.
    assert rows[2]["train/learning_rate"] == pytest.approx(1e-4 * lr_lambda(2, 4, 0, "cosine"))
    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and (out / "checkpoints" / "step-000004" / "ds" / "global_step4").is_dir()

    fresh = run_train("smoke/a_only", out, *_sets(tiny, "training.max_steps=1"), flags=("--overwrite",))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    moved = list(tmp_path.glob("run.old-*"))
    assert len(moved) == 1 and [r["step"] for r in metrics(moved[0])] == [1, 2, 3, 4]
    assert [r["step"] for r in metrics(out)] == [1]
    assert list((out / "tb").glob("events.out.tfevents.*"))  # TensorBoard follows output_dir
