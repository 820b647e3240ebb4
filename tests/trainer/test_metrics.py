"""Step metrics: aggregation rules, 2-rank gloo reduction, jsonl and TensorBoard output."""

import glob
import json
import os
import time

import pytest
import torch.multiprocessing as mp

from toolkit.trainer.metrics import MetricsWriter, StepMetrics, reduce


def test_sum_mean_max_rules():
    m = StepMetrics()
    m.add_sum("stage2/raw_rollouts", 3)
    m.add_sum("stage2/raw_rollouts", 4)
    m.add_mean("loss/ce", 1.0, weight=1)
    m.add_mean("loss/ce", 4.0, weight=3)  # segment-weighted: (1 + 12) / 4
    m.add_max("time/rollout_s", 2.5)
    m.add_max("time/rollout_s", 1.0)
    m.add_max("rollout/repeat_terminate_active", 0)
    m.add_max("rollout/repeat_terminate_active", 1)
    out = m.finalize()
    assert out == {
        "loss/ce": 13 / 4,
        "rollout/repeat_terminate_active": 1.0,
        "stage2/raw_rollouts": 7.0,
        "time/rollout_s": 2.5,
    }


def test_truncated_rate_is_ratio_of_sums_not_mean_of_rates():
    m = StepMetrics()
    m.add_ratio("rollout/parse_truncated_rate", 1, 2)  # 0.5
    m.add_ratio("rollout/parse_truncated_rate", 2, 5)  # 0.4
    assert m.finalize()["rollout/parse_truncated_rate"] == pytest.approx(3 / 7)
    assert m.finalize()["rollout/parse_truncated_rate"] != pytest.approx(0.45)


def test_detection_counts_give_global_precision_recall_f1():
    m = StepMetrics()
    m.add_detection_counts("rollout", matched=1, pred=2, gt=4)
    m.add_detection_counts("rollout", matched=3, pred=3, gt=4)
    out = m.finalize()
    p, r = 4 / 5, 4 / 8
    assert out["rollout/precision"] == pytest.approx(p)
    assert out["rollout/recall"] == pytest.approx(r)
    assert out["rollout/f1"] == pytest.approx(2 * p * r / (p + r))
    assert (out["rollout/fp"], out["rollout/fn"]) == (1.0, 4.0)


def test_zero_denominators_and_rule_conflicts():
    m = StepMetrics()
    m.add_ratio("rollout/precision", 0, 0)
    m.add_mean("loss/ce", 5.0, weight=0)
    assert m.finalize() == {"loss/ce": 0.0, "rollout/precision": 0.0}
    with pytest.raises(ValueError, match="rule 'ratio'"):
        m.add_sum("rollout/precision", 1)
    with pytest.raises(ValueError, match="rule must be one of"):
        m._add("x", "median", 1)


def test_merge_and_from_states_equal_sequential_adds():
    a, b, both = StepMetrics(), StepMetrics(), StepMetrics()
    for target, v in ((a, 1.0), (b, 3.0)):
        target.add_mean("loss/total", v, 2)
        target.add_ratio("r", v, 4)
        target.add_max("t", v)
        both.add_mean("loss/total", v, 2)
        both.add_ratio("r", v, 4)
        both.add_max("t", v)
    merged = StepMetrics.from_states([a.state(), b.state()])
    a.merge(b)
    assert merged.finalize() == a.finalize() == both.finalize()


def test_reduce_without_process_group_is_local():
    m = StepMetrics()
    m.add_sum("k", 2)
    assert reduce(m) == {"k": 2.0}


def _rank_worker(rank, world, store_path, out_dir):
    import torch.distributed as dist

    from toolkit.trainer.metrics import StepMetrics, reduce

    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    calls = []
    for name in (
        "all_gather_object",
        "all_reduce",
        "all_gather",
        "broadcast",
        "broadcast_object_list",
        "barrier",
        "gather_object",
        "reduce",
    ):
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    m = StepMetrics()
    m.add_sum("stage2/raw_rollouts", 2 + rank)
    m.add_mean("loss/ce", [1.0, 3.0][rank], weight=[1, 3][rank])
    m.add_max("time/forward_s", [0.5, 0.2][rank])
    m.add_ratio("rollout/parse_truncated_rate", *[(1, 2), (2, 5)][rank])
    m.add_detection_counts("rollout", *[(1, 2, 4), (3, 3, 4)][rank])
    if rank == 1:  # only one rank saw this drop reason: the key union must still carry it
        m.add_sum("stage2/drop_bbox_invalid", 5)
    out = reduce(m)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"out": out, "calls": calls}, f)
    dist.destroy_process_group()


@pytest.mark.dist
def test_reduce_over_two_gloo_ranks(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["out"] == results[1]["out"]
    out = results[0]["out"]
    assert out["stage2/raw_rollouts"] == 5.0
    assert out["loss/ce"] == pytest.approx((1.0 + 9.0) / 4)
    assert out["time/forward_s"] == 0.5
    assert out["rollout/parse_truncated_rate"] == pytest.approx(3 / 7)
    assert out["rollout/precision"] == pytest.approx(4 / 5)
    assert out["rollout/f1"] == pytest.approx(8 / 13)
    assert out["stage2/drop_bbox_invalid"] == 5.0
    assert all(r["calls"] == ["all_gather_object"] for r in results)


def _read_tb_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_writer_rank0_jsonl_and_tensorboard(tmp_path):
    out_dir, tb_dir = tmp_path / "out", tmp_path / "tb"
    writer = MetricsWriter(out_dir, tb_dir, rank=0)
    writer.write(0, "A", {"loss/ce": 1.5, "stage2/channel_a": 1.0})
    # Flushed per step: readable before close (a crash after this point loses nothing).
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 0, "channel": "A", "loss/ce": 1.5, "stage2/channel_a": 1.0}
    assert glob.glob(str(tb_dir / "events.out.tfevents.*"))
    writer.write(1, "B", {"loss/ce": 0.5, "rollout/f1": float("nan")})
    scalars = _read_tb_scalars(str(tb_dir))
    assert scalars["loss/ce"] == [(0, 1.5), (1, 0.5)]
    writer.close()
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1]
    assert json.loads(lines[1])["rollout/f1"] is None  # strict JSON: non-finite -> null
    with pytest.raises(RuntimeError, match="after close"):
        writer.write(2, "A", {})
    with MetricsWriter(out_dir, tb_dir, rank=0) as again:  # resume appends
        again.write(2, "A", {"loss/ce": 0.1})
        with pytest.raises(ValueError, match="clash"):
            again.write(3, "A", {"step": 1.0})
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 3


def test_writer_other_ranks_write_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "out", tmp_path / "tb", rank=1)
    writer.write(0, "A", {"loss/ce": 1.0})
    writer.close()
    assert not (tmp_path / "out").exists() and not (tmp_path / "tb").exists()


def test_shorthands_and_alias():
    from toolkit.trainer.metrics import reduce_metrics

    m = StepMetrics()
    m.count("stage2/drop/too_long")
    m.count("stage2/drop/too_long", 2)
    m.time("time/step_s", 1.0)
    m.time("time/step_s", 3.0)
    assert reduce is reduce_metrics
    assert reduce_metrics(m) == {"stage2/drop/too_long": 3.0, "time/step_s": 3.0}


def test_writer_resume_drops_records_of_replayed_steps_and_honours_sinks(tmp_path):
    """Steps are named by optimizer steps completed: resuming the checkpoint after step 2 keeps steps 1-2."""
    w = MetricsWriter(tmp_path, tmp_path / "tb", rank=0, sinks=("jsonl",))
    for step in range(1, 5):
        w.write(step, "A", {"loss/total": float(step)})
    w.close()
    assert not (tmp_path / "tb").exists()
    w = MetricsWriter(tmp_path, tmp_path / "tb", rank=0, sinks=("jsonl",), resume_step=2)
    w.write(3, "B", {"loss/total": 9.0})
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["channel"]) for r in rows] == [(1, "A"), (2, "A"), (3, "B")]


def test_writer_resume_hides_tensorboard_points_after_the_checkpoint(tmp_path):
    """A resumed run's curve has each step once: points logged after the checkpoint are purged."""
    w = MetricsWriter(tmp_path, tmp_path / "tb", rank=0, sinks=("tensorboard",))
    for step in range(1, 5):
        w.write(step, "A", {"loss/total": float(step)})
    w.close()
    time.sleep(1.1)  # a new events file (names carry the second)
    w = MetricsWriter(tmp_path, tmp_path / "tb", rank=0, sinks=("tensorboard",), resume_step=2)
    w.write(3, "B", {"loss/total": 9.0})
    w.close()
    assert _read_tb_scalars(str(tmp_path / "tb"))["loss/total"] == [(1, 1.0), (2, 2.0), (3, 9.0)]
