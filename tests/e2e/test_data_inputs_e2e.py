"""The three record inputs train through the public entry point (docs/DATA.md): the predecessor's raw files as
they are (both coordinate surfaces, poly objects, no ids), a COCO file converted by `stage2 data convert`,
and (slow) LVIS-shaped scenes with 40-60 objects and 1-2k-token answers, packed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from _e2e_runs import ROOT, run_train
from _shared import child_env, metrics

pytestmark = pytest.mark.e2e
VLM_DATA = ROOT / "assets" / "vlm" / "data"
POLY = {"poly": [100, 100, 300, 100, 300, 300, 100, 300], "poly_points": 4, "desc": "circle"}


def vlm_records(n: int, split: str = "train") -> list[dict]:
    lines = (VLM_DATA / f"{split}.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def copy_images(records, folder):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for rec in records:
        shutil.copy(VLM_DATA / rec["images"][0], folder / rec["images"][0])


def predecessor_line(rec: dict, coord: bool, k: int) -> str:
    """One line in the predecessor's raw contract: no id, bins as ints (*.norm) or coord strings (*.coord)."""
    objects = [
        {"bbox_2d": [f"<|coord_{v}|>" for v in o["bbox_2d"]] if coord else o["bbox_2d"], "desc": o["desc"]}
        for o in rec["objects"]
    ]
    if k % 2 == 0:
        objects.insert(0, POLY)  # every other record carries a poly
    line = {"images": rec["images"], "objects": objects, "width": rec["width"], "height": rec["height"]}
    if k % 3 == 0:
        line.update(summary="shapes on a plain background", metadata={"source": "predecessor", "k": k})
    return json.dumps(line)


@pytest.fixture
def predecessor_files(tmp_path):
    data = tmp_path / "lvis" / "bbox_max60"
    train, val = vlm_records(8), vlm_records(4, "val")
    copy_images(train + val, data)
    (data / "train.coord.jsonl").write_text("".join(predecessor_line(r, True, k) + "\n" for k, r in enumerate(train)))
    (data / "val.norm.jsonl").write_text("".join(predecessor_line(r, False, k) + "\n" for k, r in enumerate(val)))
    return data / "train.coord.jsonl", data / "val.norm.jsonl"


def test_predecessor_files_train_as_they_are_with_polys_dropped_and_counted(predecessor_files, tmp_path):
    train, val = predecessor_files
    out = tmp_path / "run"
    res = run_train(
        "smoke/vlm_ab_mixed",
        out,
        f"data.train_jsonl={train}",
        f"data.val_jsonl={val}",
        "data.poly_policy=drop",
        "training.max_steps=2",
        "training.eval_steps=2",
        "training.save_strategy=no",
        "rollout_matching.max_new_tokens=64",
    )
    assert res.returncode == 0, res.stderr[-4000:]
    rows = metrics(out)
    assert [r["channel"] for r in rows] == ["A", "B"] and rows[0]["loss/total"] > 0
    assert rows[0]["stage2/segments"] == 8 and rows[1]["eval_rollout/samples"] == 4
    assert rows[0]["data/train_poly_dropped"] == 4 and rows[0]["data/val_poly_dropped"] == 2
    assert f"{train}: dropped 4 poly object(s) in 4 record(s)" in res.stderr


def test_predecessor_polys_stop_the_default_policy_with_file_and_line(predecessor_files, tmp_path):
    train, val = predecessor_files
    res = run_train("smoke/vlm_ab_mixed", tmp_path / "run", f"data.train_jsonl={train}", f"data.val_jsonl={val}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"{train}:1: objects[0] is a poly" in res.stderr and "data.poly_policy: drop" in res.stderr


def coco_from_vlm(folder, records) -> tuple:
    """A COCO instances file for the embedded shapes (pixel xywh), images in folder/coco_images."""
    img_dir = folder / "coco_images"
    img_dir.mkdir(parents=True)
    images, anns, cats = [], [], {}
    for i, rec in enumerate(records, 1):
        name = f"{i:012d}.png"
        shutil.copy(VLM_DATA / rec["images"][0], img_dir / name)
        w, h = rec["width"], rec["height"]
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for o in rec["objects"]:
            x1, y1, x2, y2 = (o["bbox_2d"][k] / 999 * (w if k % 2 == 0 else h) for k in range(4))
            cid = cats.setdefault(o["desc"], len(cats) + 1)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": cid,
                    "iscrowd": 0,
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                }
            )
    ann = folder / "instances.json"
    categories = [{"id": c, "name": n, "supercategory": "shape"} for n, c in cats.items()]
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return ann, img_dir


def test_a_coco_file_converts_loads_and_trains(tmp_path):
    records = vlm_records(8)
    ann, img_dir = coco_from_vlm(tmp_path, records)
    out = tmp_path / "converted" / "train.jsonl"
    conv = subprocess.run(
        [
            sys.executable,
            "-c",
            "from launchers.cli import main; main()",
            "data",
            "convert",
            "--coco",
            str(ann),
            "--images",
            str(img_dir),
            "--out",
            str(out),
            "--max-side",
            "84",
            "--model",
            "assets/vlm/stage1",
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert conv.returncode == 0, conv.stderr[-3000:]
    assert "records written: 8" in conv.stderr and "images resized: 8" in conv.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert all((r["width"], r["height"]) == (84, 84) for r in got)
    for rec, conv_rec in zip(records, got):  # pixel round trip: every bin within one of the original
        for a, b in zip(rec["objects"], conv_rec["objects"]):
            assert a["desc"] == b["desc"] and max(abs(p - q) for p, q in zip(a["bbox_2d"], b["bbox_2d"])) <= 1
    res = run_train(
        "smoke/vlm_ab_mixed",
        tmp_path / "run",
        f"data.train_jsonl={out}",
        "data.val_jsonl=null",
        "training.eval_strategy=no",
        "training.max_steps=1",
        "training.save_strategy=no",
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert metrics(tmp_path / "run")[0]["stage2/segments"] == 8


@pytest.mark.slow
def test_lvis_shaped_scenes_train_two_packed_steps(tmp_path):
    """40-60 objects per image, ~44% of boxes under 20 bins, answers of 1-2k tokens; packing on."""
    from toolkit.data.synth_lvis import write_lvis_like

    train = write_lvis_like(tmp_path / "lvis", 4)
    out = tmp_path / "run"
    res = run_train(
        "smoke/vlm_ab_mixed",
        out,
        f"data.train_jsonl={train}",
        "data.val_jsonl=null",
        "training.eval_strategy=no",
        "training.max_steps=2",
        "training.save_strategy=no",
        "training.effective_batch_size=4",
        "training.packing=true",
        "global_max_length=4096",
        "rollout_matching.max_new_tokens=2048",
        "rollout_matching.vllm.max_model_len=4096",
        timeout=1800,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = metrics(out)
    assert (a["channel"], b["channel"]) == ("A", "B")
    assert a["stage2/segments"] == 4 and a["stage2/dropped_samples"] == 0 and a["loss/total"] > 0
    assert a["packing/post_rollout_selected_total_len"] > 2048  # several 1-2k-token segments share a pack
    assert b["rollout/gt_objects"] >= 160 and b["stage2/segments"] + b["stage2/dropped_samples"] == 4
