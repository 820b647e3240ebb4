"""Stage-1 of the embedded default: plain teacher forcing of the tiny Qwen2 on the synthetic train split.

Owns the Stage-1 recipe (STAGE1), its training loop, and the greedy-rollout evaluation (valid-parse
rate and object F1 at IoU >= 0.5 with matching classes, Hungarian on 1 - IoU). Called by
build_assets.py; deterministic on CPU: one thread, fixed seeds, a fixed step count, deterministic
algorithms. The loop also runs on CUDA (device=...) for recipe exploration, not for the shipped bytes.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from toolkit.data.coords import parse_coord_token  # noqa: E402
from toolkit.data.records import load_records  # noqa: E402
from toolkit.data.render import render_answer, render_messages  # noqa: E402
from toolkit.data.tokenizer import encode_prompt, encode_teacher, load_tokenizer  # noqa: E402

STAGE1 = {
    "seed": 7,
    "steps": 4000,
    "batch_size": 16,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,  # cosine decay from lr to lr * min_lr_ratio after warmup
    "warmup_steps": 200,
    "weight_decay": 0.01,
    "betas": (0.9, 0.98),
    "grad_clip": 1.0,
    # (first step, max objects per sampled record): a curriculum from single objects upward
    "curriculum": ((0, 1), (300, 2), (900, 3), (1800, 4)),
    "eval_every": 500,
    "eval_records": 128,  # the whole val split
    "eval_batch": 64,
}


# ---- evaluation: parse, match, F1 -------------------------------------------------------------------------
def parse_answer(text: str) -> list[dict] | None:
    """Objects of one decoded answer (text before <|im_end|>), or None when it is not a JSON object.

    Entries that are not {desc: str, bbox_2d: [4 coord tokens]} with x1<=x2, y1<=y2 are dropped.
    """
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    objects = []
    for value in data.values():
        if not isinstance(value, dict) or not isinstance(value.get("desc"), str):
            continue
        geom = value.get("bbox_2d")
        if not isinstance(geom, list) or len(geom) != 4:
            continue
        bins = [parse_coord_token(v) if isinstance(v, str) else None for v in geom]
        if None in bins or bins[0] > bins[2] or bins[1] > bins[3]:
            continue
        objects.append({"desc": value["desc"], "bbox_2d": bins})
    return objects


def box_iou(a, b) -> float:
    """IoU of two [x1, y1, x2, y2] boxes in bin units (a zero-area box has IoU 0)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0) * max(ih, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def count_matches(pred: list[dict], gt: list[dict], iou_gate: float = 0.5) -> int:
    """True positives: Hungarian on 1 - IoU over pairs with the same class and IoU >= iou_gate."""
    if not pred or not gt:
        return 0
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    forbidden = 1e6
    cost = np.full((len(pred), len(gt)), forbidden)
    for i, p in enumerate(pred):
        for j, g in enumerate(gt):
            iou = box_iou(p["bbox_2d"], g["bbox_2d"])
            if p["desc"] == g["desc"] and iou >= iou_gate:
                cost[i, j] = 1.0 - iou
    rows, cols = linear_sum_assignment(cost)
    return int(sum(cost[r, c] < forbidden for r, c in zip(rows, cols)))


def score(preds: list[list[dict] | None], gts: list[list[dict]]) -> dict:
    """Pooled metrics; an unparsable answer counts all its GT objects as false negatives."""
    tp = sum(count_matches(p or [], g) for p, g in zip(preds, gts))
    n_pred = sum(len(p or []) for p in preds)
    n_gt = sum(len(g) for g in gts)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gt if n_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    valid = sum(p is not None for p in preds) / max(len(preds), 1)
    return {"valid_parse": valid, "f1": f1, "precision": precision, "recall": recall}


def greedy_answers(model, tok, records, batch: int, max_new_tokens: int, device="cpu") -> list[str | None]:
    """Greedy rollouts; the text before <|im_end|>, or None when the answer never ended."""
    import torch

    end = tok.eos_token_id
    texts: list[str | None] = []
    model.eval()
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        prompts = [encode_prompt(tok, render_messages(r.scene)) for r in chunk]
        enc = tok.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=end
            )
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            texts.append(tok.decode(row[: row.index(end)], skip_special_tokens=False) if end in row else None)
    model.train()
    return texts


def evaluate(model, tok, records, batch: int, device="cpu") -> dict:
    """Valid-parse rate and object F1 of greedy rollouts on `records`."""
    from toolkit.data.tokenizer import encode_answer

    longest = max(len(encode_answer(tok, render_answer(r.objects))) for r in records)
    texts = greedy_answers(model, tok, records, batch, longest + 16, device)
    preds = [parse_answer(t) if t is not None else None for t in texts]
    return score(preds, [list(r.objects) for r in records])


# ---- training -----------------------------------------------------------------------------------------------
def lr_at(step: int, cfg: dict) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    frac = (step - cfg["warmup_steps"]) / max(cfg["steps"] - cfg["warmup_steps"], 1)
    floor = cfg["min_lr_ratio"]
    return cfg["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def max_objects_at(step: int, cfg: dict) -> int:
    return [n for first, n in cfg["curriculum"] if step >= first][-1]


def encode_split(tok, records) -> list[tuple[list[int], int, int]]:
    """(input_ids, prompt_len, n_objects) per record."""
    out = []
    for r in records:
        ids, plen = encode_teacher(tok, render_messages(r.scene), render_answer(r.objects))
        out.append((ids, plen, len(r.objects)))
    return out


def make_batch(samples, pad_id: int, device):
    """Right-padded input_ids / attention_mask / labels (labels only on the answer and its <|im_end|>)."""
    import torch

    width = max(len(ids) for ids, _, _ in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    for row, (seq, plen, _) in enumerate(samples):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, plen : len(seq)] = torch.tensor(seq[plen:])
    return ids.to(device), mask.to(device), labels.to(device)


def train(model, tok, train_records, val_records, cfg: dict, device="cpu", log=print) -> list[dict]:
    """Teacher-force `model` for cfg['steps'] steps; returns the curve rows (also passed to `log`)."""
    import torch

    torch.manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"])
    data = encode_split(tok, train_records)
    pools = {k: [s for s in data if s[2] <= k] for k in {n for _, n in cfg["curriculum"]}}
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"],
        betas=tuple(cfg["betas"]),
    )
    model.train()
    curve, losses, t0 = [], [], time.time()
    for step in range(cfg["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        pool = pools[max_objects_at(step, cfg)]
        ids, mask, labels = make_batch(
            [pool[rng.randrange(len(pool))] for _ in range(cfg["batch_size"])], tok.pad_token_id, device
        )
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        losses.append(loss.item())  # a sync point; cheap at this size
        done = step + 1
        if done % cfg["eval_every"] == 0 or done == cfg["steps"]:
            metrics = evaluate(model, tok, val_records[: cfg["eval_records"]], cfg["eval_batch"], device)
            row = {
                "step": done,
                "loss": round(sum(losses) / len(losses), 4),
                "max_objects": max_objects_at(step, cfg),
                **{k: round(v, 4) for k, v in metrics.items()},
            }
            curve.append(row)
            log({**row, "elapsed_s": round(time.time() - t0, 1)})
            losses = []
    return curve


def build_stage1(out: Path, steps: int | None = None) -> dict:
    """Train from out/tiny_qwen2 on out/data, save the checkpoint + tokenizer + curve to out/stage1."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cfg = dict(STAGE1, **({"steps": steps} if steps is not None else {}))
    tok = load_tokenizer(out / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(str(out / "tiny_qwen2"), dtype=torch.float32)
    train_records = load_records(out / "data" / "train.jsonl")
    val_records = load_records(out / "data" / "val.jsonl")

    def log(row):
        print(json.dumps(row), file=sys.stderr, flush=True)

    curve = train(model, tok, train_records, val_records, cfg, "cpu", log)
    dest = out / "stage1"
    if dest.exists():
        shutil.rmtree(dest)
    model.save_pretrained(str(dest))
    for src in sorted((out / "tokenizer").iterdir()):  # byte copies: stage1/ carries the very same tokenizer
        shutil.copyfile(src, dest / src.name)
    with (dest / "training_curve.jsonl").open("w", encoding="utf-8", newline="\n") as fh:
        for row in curve:
            fh.write(json.dumps(row) + "\n")
    return curve[-1]
