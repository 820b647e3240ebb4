"""Channel worker for tests/trainer/test_channel_equivalence.py: the real Channel-A / Channel-B losses through
`Stage2Engine.train_step`, against plain PyTorch. One process per rank (torchrun), or a plain process for
world size 1; rank 0 writes a JSON report to --out, the test asserts.

Samples are real: records from assets/data/val.jsonl, prompts from the project tokenizer's chat template
(assets/tokenizer), Channel-B segments from synthetic rollouts (the canonical answer with objects
dropped, shifted, moved far away, duplicated, made invalid, truncated, or no JSON at all) through the
trainer's parse → match → FN-append recipe (`channel_b.rollout_to_segment`), Channel-A segments from
`build_channel_a_segment`; then `plan_packs` / `collate_pack` and the trainer's pack weights
n_segments / N_raw_local (drops count in N_raw). Each ZeRO stage runs one engine through STEPS, one
optimizer step per loss variant, each from the same initial state (a checkpoint reload); a plain-PyTorch
reference on rank 0 backpropagates every rank's packs from that state with weight
n_segments / (N_raw · world), clips and steps the same AdamW.
"""
from __future__ import annotations

import copy
import faulthandler
import functools
import gc
import json
import os
import sys
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)
from _torchrun import worker_parser, write_report  # noqa: E402
from toolkit.trainer import engine as eng  # noqa: E402
from toolkit.trainer import optim  # noqa: E402

SYSTEM = "Detect every object."  # a short template.system_prompt keeps the packs small
TOKENIZER = os.path.join(ROOT, "assets", "tokenizer")
RECORDS = os.path.join(ROOT, "assets", "data", "val.jsonl")
CAP = 256  # global_max_length: the pack capacity and the segments' max_len
OPT = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-3)  # eps ≫ |g|: the update scales with g
MAX_GRAD_NORM, WARMUP, TOTAL = 1.0, 2, 8
GRAD_CKPT_STAGES = {"2", "3"}  # recompute in backward, as the real runs do
# stage2_ab loss weights with every term on, so each one is in the gradient.
LOSS = dict(bbox_smoothl1_weight=1.0, bbox_ciou_weight=1.0, coord_ce_weight=0.2, coord_el1_weight=0.5,
            coord_ehuber_weight=0.5, coord_huber_delta=0.01, coord_entropy_weight=0.02, coord_gate_weight=1.0,
            softctx_temperature=0.7)
RM = dict(candidate_top_k=10, maskiou_gate=0.3, maskiou_resolution=256, fp_cost=1.0, fn_cost=1.0,
          object_field_order="desc_first")
SAB = dict(desc_ce_weight=0.5, channel_b={"drop_invalid_struct_ce_multiplier": 2.0})
# One optimizer step per entry: (channel, n_softctx_iter, softctx_grad_mode). n_iter 3 em_detach adds a
# no_grad middle pass (under ZeRO-3 a forward outside autograd between two recorded ones).
STEPS = [("B", 1, "-"), ("A", 1, "unroll"), ("A", 1, "em_detach"), ("A", 2, "unroll"), ("A", 2, "em_detach"),
         ("A", 3, "em_detach"), ("B", 1, "-")]
# SAMPLES[step][rank]: (val record index, rollout variant) of the N_RAW raw samples; world 1 runs rank 0's.
# Val record i holds i % 4 + 1 objects. Pack counts (rank 0, rank 1): 3:1, 1:3, 3:1, 2:3, 3:1, 1:3, 3:0.
def _same(first: int, variant: str = "") -> list[tuple[int, str]]:
    return [(first + 4 * k, variant) for k in range(5)]


SAMPLES = [
    [[(3, "exact"), (7, "shift"), (11, "dup_invalid"), (15, "truncated"), (19, "drop")],
     [(0, "none"), (4, "drop"), (8, "shift"), (12, "exact"), (16, "long")]],
    [_same(0), _same(3)],
    [_same(23), _same(20)],
    [_same(1), _same(2)],
    [_same(22), _same(40)],
    [_same(44), _same(43)],
    [[(23, "drop"), (27, "shift"), (31, "dup_invalid"), (35, "truncated"), (2, "none")], _same(1, "long")],
]
N_RAW = 5
DEV = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")


# ---- real samples → segments → packs ------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def data():
    """(tokenizer, codec, records): loaded once per process."""
    from toolkit.data.records import load_records
    from toolkit.data.tokenizer import load_tokenizer
    from toolkit.rollout.codec import HFTokenCodec

    tok = load_tokenizer(TOKENIZER)
    return tok, HFTokenCodec(tok), load_records(RECORDS)


def synthetic_rollout(gt: list[dict], variant: str, codec) -> list[int]:
    """Completion ids a model could have decoded for these GT objects (canonical order, desc_first)."""
    from toolkit.data.coords import coord_token
    from toolkit.data.render import canonical_order, dumps_payload, object_payload

    def entry(n, o):
        return f'"object_{n}": ' + dumps_payload(object_payload(o["desc"], o["bbox_2d"]))

    objs, end = canonical_order(gt), [codec.im_end_id]
    if variant == "none":  # no JSON at all: fallback prefix "{", every GT is FN-appended
        return codec.encode("no objects here") + end
    if variant == "drop":  # last object missing: FN
        items = [entry(n, o) for n, o in enumerate(objs[:-1], 1)]
    elif variant == "shift":  # first object shifted (still matched), second moved far away (FP + FN)
        first = {**objs[0], "bbox_2d": [min(999, v + 8) for v in objs[0]["bbox_2d"]]}
        items = [entry(1, first)] + [entry(n, {**o, "bbox_2d": [990, 990, 999, 999]} if n == 2 else o)
                                     for n, o in enumerate(objs[1:], 2)]
    elif variant in ("dup_invalid", "long"):  # an invalid entry (2 coords: parse drop), duplicates (FP);
        # "long" repeats the duplicate 12 times: longer than CAP, so the sample is a too_long drop
        bad = f'"object_2": {{"desc": "{objs[0]["desc"]}", "bbox_2d": ["{coord_token(5)}", "{coord_token(6)}"]}}'
        dups = [entry(3 + k, objs[0]) for k in range(1 if variant == "dup_invalid" else 12)]
        items = [entry(1, objs[0]), bad, *dups] + [entry(n, o) for n, o in enumerate(objs[1:], 3 + len(dups))]
    elif variant == "truncated":  # cut inside the last object, no <|im_end|>
        return codec.encode(("{" + ", ".join(entry(n, o) for n, o in enumerate(objs, 1)))[:-12])
    else:
        items = [entry(n, o) for n, o in enumerate(objs, 1)]
    return codec.encode("{" + ", ".join(items) + "}") + end


def segments_for(step: int, rank: int) -> tuple[list, dict]:
    """This rank's segments for `step` (drops left out) and the summed per-sample meta counters."""
    from toolkit.data.render import render_messages
    from toolkit.data.tokenizer import encode_prompt
    from toolkit.rollout.backends.base import Rollout
    from toolkit.rollout.targets import Drop, build_channel_a_segment
    from toolkit.trainer.channel_b import SampleInput, rollout_to_segment

    tok, codec, records = data()
    channel = STEPS[step][0]
    segs, meta = [], {}
    for index, variant in SAMPLES[step][rank]:
        rec = records[index]
        prompt = encode_prompt(tok, render_messages(rec.scene, SYSTEM))
        sample = SampleInput(rec.id, prompt, [dict(o) for o in rec.objects])
        if channel == "B":
            ro = Rollout(prompt, synthetic_rollout(sample.gt_objects, variant, codec), "stop")
            seg = rollout_to_segment(sample, ro, codec, rm=RM, sab=SAB, max_len=CAP, ordering="sorted")
        else:
            seg = build_channel_a_segment(prompt, sample.gt_objects, codec, desc_ce_weight=SAB["desc_ce_weight"],
                                          sample_id=sample.sample_id, max_len=CAP)
        for key, value in seg.meta.items():
            meta[key] = meta.get(key, 0) + value
        if isinstance(seg, Drop):
            meta[f"stage2/drop/{seg.reason}"] = meta.get(f"stage2/drop/{seg.reason}", 0) + 1
        else:
            segs.append(seg)
    return segs, meta


@functools.lru_cache(maxsize=None)
def packs_for(step: int, rank: int) -> tuple[list, list[float], dict]:
    """(packs, weights n_segments / N_raw_local, meta) exactly as Stage2Trainer.train_step builds them."""
    from toolkit.trainer.packing import collate_pack, plan_packs

    segs, meta = segments_for(step, rank)
    plan = plan_packs([len(s) for s in segs], CAP) if segs else []
    packs = [collate_pack([segs[i] for i in idx]).to(DEV) for idx in plan]
    return packs, [p.n_segments / N_RAW for p in packs], meta


def plan_counts(world: int) -> list[list[int]]:
    return [[len(packs_for(step, r)[0]) for r in range(world)] for step in range(len(STEPS))]


# ---- model and the real losses ------------------------------------------------------------------------
def tiny_model(seed: int):
    """A random Qwen2 whose vocabulary is the committed tokenizer's (head_dim 32, untied)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(data()[0]), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=data()[0].pad_token_id)
    return Qwen2ForCausalLM(cfg).float().to(DEV)


def make_loss_fn(step: int, n_iter: int | None = None, grad_mode: str | None = None):
    """The trainer's per-pack loss for this step (as Stage2Trainer._loss_a / _loss_b); Channel-A knobs overridable."""
    from toolkit.trainer.channel_a import softctx_logits
    from toolkit.trainer.losses import LossWeights, pack_loss

    channel = STEPS[step][0]
    n_iter = STEPS[step][1] if n_iter is None else n_iter
    grad_mode = STEPS[step][2] if grad_mode is None else grad_mode
    weights = LossWeights(**LOSS)
    coord_ids = torch.tensor(data()[1].coord_token_ids, dtype=torch.long)

    def loss_b(module, pack):
        logits = module(input_ids=pack.input_ids, position_ids=pack.position_ids, use_cache=False).logits
        return pack_loss(logits, logits, pack, coord_ids, weights)

    def loss_a(module, pack):
        first, last = softctx_logits(module, pack, coord_ids, n_iter, LOSS["softctx_temperature"], grad_mode)
        return pack_loss(first, last, pack, coord_ids, weights)

    return loss_b if channel == "B" else loss_a


class Reference:
    """Plain PyTorch on one process: same init, every rank's packs, same AdamW, clipping and LambdaLR."""

    def __init__(self, model):
        self.model = model
        self.opt = optim.build_optimizer(model, **OPT)
        self.sched = optim.build_lr_scheduler(self.opt, TOTAL, WARMUP, "cosine")

    def step(self, step: int, world: int, weight_of, loss_fn=None) -> dict:
        """weight_of(pack, rank's packs, world) scales each pack's loss; returns per-rank Σ w·loss."""
        lr = self.opt.param_groups[0]["lr"]
        loss_fn = loss_fn or make_loss_fn(step)
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        rank_losses = []
        for rank in range(world):
            packs, weights, _ = packs_for(step, rank)
            total = 0.0
            for pack, w in zip(packs, weights):
                loss, _ = loss_fn(self.model, pack)
                (loss * weight_of(pack, packs, world)).backward()
                total += float(loss.detach()) * w
            rank_losses.append(total)
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM))
        self.opt.step()
        self.sched.step()
        return {"rank_losses": rank_losses, "grad_norm": norm, "lr": lr}


def global_mean_weight(pack, packs, world):
    """The update of the mean over all ranks' raw samples: n_segments / (N_raw · world)."""
    return pack.n_segments / (N_RAW * world)


def max_abs(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].float().cpu() - b[k].float().cpu()).abs().max()) for k in a)


def params_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- one engine per stage ------------------------------------------------------------------------------
def ds_config(stage: str) -> dict:
    """The shipped ds_configs/ file; ZeRO-3 with persistence threshold 0, so the tiny model really partitions."""
    with open(os.path.join(ROOT, "ds_configs", f"zero{stage}.json")) as fh:
        cfg = json.load(fh)
    if stage == "3":
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return cfg


def run_stage(stage: str, info, tmp: str) -> dict:
    """One engine runs every entry of STEPS; before each it reloads the initial checkpoint (exact, see
    test_engine_equivalence), so each row is one optimizer step from the same parameters, optimizer and
    LR state, compared with a fresh reference, while the engine itself sees the channels alternate."""
    import torch.distributed as dist

    world, rank = info.world_size, info.rank
    model = tiny_model(seed=0)
    init = copy.deepcopy(model) if rank == 0 else None
    t0 = time.time()
    if stage in GRAD_CKPT_STAGES:
        model.gradient_checkpointing_enable()
    opt = optim.build_optimizer(model, **OPT)
    engine = eng.Stage2Engine(model, opt, optim.build_lr_scheduler(opt, TOTAL, WARMUP, "cosine"), ds_config(stage),
                              max_grad_norm=MAX_GRAD_NORM)
    ckpt = os.path.join(tmp, f"init_z{stage}")
    engine.save(ckpt, "init")
    rows, mine = [], []
    for step in range(len(STEPS)):
        if step:
            engine.load(ckpt, "init")
        packs, weights, _ = packs_for(step, rank)
        res = engine.train_step(packs, make_loss_fn(step), weights)
        state = engine.full_state_dict()  # collective under ZeRO-3
        mine.append({"loss": res.loss, "n_packs": res.n_packs, "n_padding": res.n_padding,
                     "n_packs_max": res.n_packs_max})
        if init is not None:
            reference = Reference(copy.deepcopy(init))
            ref = reference.step(step, world, global_mean_weight)
            rows.append({"max_abs": max_abs(state, params_of(reference.model)), "grad_norm": res.grad_norm,
                         "ref_grad_norm": ref["grad_norm"], "lr": res.lr, "ref_lr": ref["lr"],
                         "ref_rank_losses": ref["rank_losses"], "skipped": res.skipped})
    all_ranks = [None] * world
    dist.all_gather_object(all_ranks, mine)
    del engine, model
    gc.collect()
    return {"accumulation": eng.ACCUMULATION[int(stage)], "steps": rows, "all_ranks": all_ranks,
            "stage_s": round(time.time() - t0, 2)}


def sensitivity(world: int, step: int, **other) -> float:
    """How far the reference moves under a wrong weighting (mean over each rank's packs) or, with `other`
    (n_iter=/grad_mode=), under the right weighting with another Channel-A variant."""
    a, b = Reference(tiny_model(0)), Reference(tiny_model(0))
    a.step(step, world, global_mean_weight)
    if other:
        b.step(step, world, global_mean_weight, make_loss_fn(step, **other))
    else:
        b.step(step, world, lambda pack, packs, w: 1.0 / (len(packs) * w))
    return max_abs(params_of(a.model), params_of(b.model))


def main() -> None:
    args = worker_parser("0,1,2,3").parse_args()
    faulthandler.enable()  # a gloo abort (collective mismatch) then shows each rank's Python stack
    torch.set_num_threads(1)
    info = eng.init_distributed()
    t0 = time.time()
    report = {"world": info.world_size, "steps": [list(s) for s in STEPS], "stages": {}}
    if info.rank == 0:
        report["plan_counts"] = plan_counts(info.world_size)
        report["meta"] = [[packs_for(s, r)[2] for r in range(info.world_size)] for s in range(len(STEPS))]
        report["sensitivity"] = [sensitivity(info.world_size, step) for step in range(len(STEPS))]
        # The variants must differ measurably, or rows of the table could not tell them apart.
        n2_unroll = STEPS.index(("A", 2, "unroll"))
        report["variant_effect"] = {
            "n2 unroll vs em_detach": sensitivity(info.world_size, n2_unroll, grad_mode="em_detach"),
            "n2 vs n1": sensitivity(info.world_size, n2_unroll, n_iter=1),
        }
    for stage in [s for s in args.stages.split(",") if s]:
        report["stages"][stage] = run_stage(stage, info, args.tmp)
    report["wall_s"] = round(time.time() - t0, 2)
    write_report(report, args.out, info.rank)
    eng.close_distributed()


if __name__ == "__main__":
    main()
