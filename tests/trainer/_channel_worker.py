"""Channel worker for tests/trainer/test_channel_equivalence.py: the trainer's own step code
(`toolkit.trainer.step.StepLearner`: packing, per-pack loss, pack weights, round-by-round learning) through
`Stage2Engine`, against an independent plain-PyTorch reference. One process per rank (torchrun), or a
plain process for world size 1; rank 0 writes a JSON report to --out, the test asserts.

Samples are real: records from assets/data/val.jsonl, prompts from the project tokenizer's chat template
(assets/tokenizer), Channel-B segments from synthetic rollouts (the canonical answer with objects
dropped, shifted, moved far away, duplicated, made invalid, truncated, or no JSON at all) through the
trainer's parse → match → FN-append recipe (`channel_b.rollout_to_segment`), Channel-A segments from
`build_channel_a_segment`. The engine side hands those segments to `StepLearner.learn` in one round (or,
for the round variants, in several) exactly as `Stage2Trainer.train_step` does.

The reference never packs: on rank 0 it runs every rank's kept segments one at a time through the plain
model (`model(input_ids)` with default positions; Channel-A's soft self-context re-written here in a few
lines), takes each sample's loss (`pack_loss` of a one-segment pack, pinned against a float64 hand
computation in test_losses.py), backpropagates Σ_samples loss / (N_raw · world) — the mean over the
step's raw samples, drops included in N_raw — then clips and steps the same AdamW and LambdaLR.

Each ZeRO stage runs one engine; before every optimizer step it reloads the initial checkpoint, so each
row is one step from the same state. Rows: every entry of STEPS with the trainer's default packing
(global_max_length CAP, uneven pack counts across ranks), and for INVARIANCE_STEPS the same segments
packed into one pack, into one pack per segment, and (Channel-B) learned in 1 or 3 server rounds.
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
sys.path.insert(0, os.path.join(ROOT, "tests"))  # _shared
from _shared import PlainStep  # noqa: E402
from _torchrun import worker_parser, write_report  # noqa: E402

from toolkit.config.settings import MatchSettings, MonitorSettings  # noqa: E402
from toolkit.trainer import distributed, optim  # noqa: E402
from toolkit.trainer import engine as eng  # noqa: E402
from toolkit.trainer.channel_b import ChannelBSettings  # noqa: E402

SYSTEM = "Detect every object."  # a short template.system_prompt keeps the packs small
TOKENIZER = os.path.join(ROOT, "assets", "tokenizer")
RECORDS = os.path.join(ROOT, "assets", "data", "val.jsonl")
CAP = 256  # global_max_length: the pack capacity and the segments' max_len
OPT = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-3)  # eps ≫ |g|: the update scales with g
MAX_GRAD_NORM, WARMUP, TOTAL = 1.0, 2, 8
GRAD_CKPT_STAGES = {"2", "3"}  # recompute in backward, as the real runs do
# stage2_ab loss weights with every term on, so each one is in the gradient. CIoU is small: on the nearly
# degenerate boxes a random model predicts (every expected coordinate ≈ 0.5) its gradient is ill-conditioned
# in fp32 (w = x2 − x1 of two close numbers), so a packed forward's 1e-7 logit noise moves it by ~1e-4 at
# weight 1 — noise, the same on both sides, but above the 1e-6 tolerance once Adam has scaled it.
LOSS = dict(
    bbox_smoothl1_weight=1.0,
    bbox_ciou_weight=0.01,
    coord_ce_weight=0.2,
    coord_el1_weight=0.5,
    coord_ehuber_weight=0.5,
    coord_huber_delta=0.01,
    coord_entropy_weight=0.02,
    coord_gate_weight=1.0,
    softctx_temperature=0.7,
)
CHANNEL_B = ChannelBSettings(
    match=MatchSettings(candidate_top_k=10, maskiou_gate=0.3, maskiou_resolution=256, fp_cost=1.0, fn_cost=1.0),
    monitor=MonitorSettings(enabled=False, every_steps=1, max_samples=0, max_text_chars=0),
    field_order="desc_first",
    ordering="sorted",
    desc_ce_weight=0.5,
    drop_invalid_struct_ce_multiplier=2.0,
    max_len=CAP,
)
# One optimizer step per entry: (channel, n_softctx_iter, softctx_grad_mode). n_iter 3 em_detach adds a
# no_grad middle pass (under ZeRO-3 a forward outside autograd between two recorded ones).
STEPS = [
    ("B", 1, "-"),
    ("A", 1, "unroll"),
    ("A", 1, "em_detach"),
    ("A", 2, "unroll"),
    ("A", 2, "em_detach"),
    ("A", 3, "em_detach"),
    ("B", 1, "-"),
]
# Steps whose segments are also packed 1 and K ways (and, for B, learned in 1 or 3 rounds).
INVARIANCE_STEPS = (3, 6)
ROUND_CUTS = {1: (5,), 3: (1, 2, 2)}  # samples per server round; 1,2,2 cuts other packs than one round on step 6


# SAMPLES[step][rank]: (val record index, rollout variant) of the N_RAW raw samples; world 1 runs rank 0's.
# Val record i holds i % 4 + 1 objects. Pack counts (rank 0, rank 1): 3:1, 1:3, 3:1, 2:3, 3:1, 1:3, 3:0.
def _same(first: int, variant: str = "") -> list[tuple[int, str]]:
    return [(first + 4 * k, variant) for k in range(5)]


SAMPLES = [
    [
        [(3, "exact"), (7, "shift"), (11, "dup_invalid"), (15, "truncated"), (19, "drop")],
        [(0, "none"), (4, "drop"), (8, "shift"), (12, "exact"), (16, "long")],
    ],
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
@functools.cache
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
        items = [entry(1, first)] + [
            entry(n, {**o, "bbox_2d": [990, 990, 999, 999]} if n == 2 else o) for n, o in enumerate(objs[1:], 2)
        ]
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


@functools.cache
def segments_of(step: int, rank: int, i: int) -> tuple[list, dict]:
    """Sample i of this rank's step: ([its segment] or [] when dropped, its meta counters)."""
    from toolkit.data.render import render_messages
    from toolkit.data.tokenizer import encode_prompt
    from toolkit.rollout.backends.base import Rollout
    from toolkit.rollout.targets import Drop, build_channel_a_segment
    from toolkit.trainer.channel_b import SampleInput, rollout_to_segment

    tok, codec, records = data()
    index, variant = SAMPLES[step][rank][i]
    rec = records[index]
    prompt = encode_prompt(tok, render_messages(rec.scene, SYSTEM))
    sample = SampleInput(rec.id, prompt, [dict(o) for o in rec.objects])
    if STEPS[step][0] == "B":
        ro = Rollout(prompt, synthetic_rollout(sample.gt_objects, variant, codec), "stop")
        seg = rollout_to_segment(sample, ro, codec, CHANNEL_B)
    else:
        seg = build_channel_a_segment(
            prompt,
            sample.gt_objects,
            codec,
            desc_ce_weight=CHANNEL_B.desc_ce_weight,
            sample_id=sample.sample_id,
            max_len=CAP,
        )
    meta = dict(seg.meta)
    if isinstance(seg, Drop):
        meta[f"stage2/drop/{seg.reason}"] = 1
        return [], meta
    return [seg], meta


def segments_for(step: int, rank: int) -> tuple[list, dict]:
    """This rank's segments for `step` (drops left out) and the summed per-sample meta counters."""
    segs, meta = [], {}
    for i in range(len(SAMPLES[step][rank])):
        mine, m = segments_of(step, rank, i)
        segs += mine
        for key, value in m.items():
            meta[key] = meta.get(key, 0) + value
    return segs, meta


def learner(step: int, normalization: str = "per_sample", **change):
    """The trainer's StepLearner for this step (Channel-A knobs from STEPS); `change` overrides fields."""
    from toolkit.trainer.losses import LossWeights
    from toolkit.trainer.step import StepLearner

    _, n_iter, grad_mode = STEPS[step]
    base = dict(
        coord_ids=torch.tensor(data()[1].coord_token_ids, dtype=torch.long, device=DEV),
        loss_weights=LossWeights(**LOSS),
        normalization=normalization,
        n_softctx_iter=n_iter,
        softctx_temperature=LOSS["softctx_temperature"],
        softctx_grad_mode=grad_mode if grad_mode != "-" else "unroll",
        capacity=CAP,
        min_fill=0.5,
        packing=True,
        device=DEV,
    )
    return StepLearner(**{**base, **change})


# Packing variants of the same segments: the trainer's default, all in one pack, one pack per segment.
PACKING = {"default": {}, "one_pack": {"capacity": 4 * CAP * N_RAW}, "per_segment": {"packing": False}}


@functools.cache
def packs_for(step: int, rank: int, packing: str = "default") -> tuple[list, list[float], dict]:
    """(packs, weights, meta) as StepLearner.learn builds them for this rank's segments."""
    from toolkit.trainer.step import pack_weights

    segs, meta = segments_for(step, rank)
    packs = learner(step, **PACKING[packing]).packer().add(segs, last=True)
    return packs, pack_weights(packs, N_RAW), meta


def rounds_for(step: int, rank: int, n_rounds: int) -> list[list]:
    """This rank's samples in `n_rounds` consecutive server rounds (ROUND_CUTS; each round's kept segments)."""
    rounds, k = [], 0
    for size in ROUND_CUTS[n_rounds]:
        rounds.append([s for i in range(k, k + size) for s in segments_of(step, rank, i)[0]])
        k += size
    return rounds


def plan_counts(world: int) -> list[list[int]]:
    return [[len(packs_for(step, r)[0]) for r in range(world)] for step in range(len(STEPS))]


# ---- model and the real losses ------------------------------------------------------------------------
def tiny_model(seed: int):
    """A random Qwen2 whose vocabulary is the committed tokenizer's (head_dim 32, untied)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(data()[0]),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=data()[0].pad_token_id,
    )
    return Qwen2ForCausalLM(cfg).float().to(DEV)


def reference_logits(model, seg, step: int, n_iter: int | None = None, grad_mode: str | None = None):
    """(CE logits, geometry logits) of one segment alone, in plain PyTorch: no packing, default positions.
    Channel-A: soft self-context written out here (pass 0 on token embeddings; each later pass feeds
    Σ_k softmax(z[p−1, coord]/τ)_k · E[coord_k] at every coordinate slot p)."""
    channel = STEPS[step][0]
    n_iter = STEPS[step][1] if n_iter is None else n_iter
    grad_mode = STEPS[step][2] if grad_mode is None else grad_mode
    ids = torch.tensor([seg.input_ids], device=DEV)
    if channel == "B":
        logits = model(input_ids=ids).logits
        return logits, logits
    emb = model.get_input_embeddings()
    coord = torch.tensor(data()[1].coord_token_ids, device=DEV)
    slots = torch.tensor(seg.coord_pos, device=DEV)
    first = logits = model(inputs_embeds=emb(ids)).logits
    for it in range(1, n_iter):
        with torch.set_grad_enabled(grad_mode == "unroll" or it == n_iter - 1):
            probs = torch.softmax(logits[0, slots - 1][:, coord] / LOSS["softctx_temperature"], dim=-1)
            soft = probs @ emb(coord)
            if grad_mode == "em_detach":
                soft = soft.detach()
            x = emb(ids).clone()
            x[0, slots] = soft
            logits = model(inputs_embeds=x).logits
    return first, logits


def sample_loss(model, seg, step: int, **variant):
    """One sample's loss: the loss terms of a one-segment pack (the normalization rules agree there)."""
    from toolkit.trainer.losses import LossWeights, pack_loss
    from toolkit.trainer.packing import collate_pack

    first, last = reference_logits(model, seg, step, **variant)
    coord = torch.tensor(data()[1].coord_token_ids, device=DEV)
    return pack_loss(first, last, collate_pack([seg]).to(DEV), coord, LossWeights(**LOSS))[0]


class Reference(PlainStep):
    """Plain PyTorch on one process: same init, every rank's samples, same AdamW, clipping and LambdaLR."""

    def __init__(self, model):
        super().__init__(model, OPT, TOTAL, WARMUP, MAX_GRAD_NORM)

    def step(self, step: int, world: int, **variant) -> dict:
        """The mean over the step's raw samples, each sample forwarded alone; `variant` (n_iter=/grad_mode=)
        changes Channel-A's soft self-context. Returns per-rank (1/N_raw) Σ loss_sample too."""

        def backward():
            rank_losses = []
            for rank in range(world):
                total = 0.0
                for seg in segments_for(step, rank)[0]:
                    loss = sample_loss(self.model, seg, step, **variant)
                    (loss / (N_RAW * world)).backward()
                    total += float(loss.detach()) / N_RAW
                rank_losses.append(total)
            return rank_losses

        return self.update(backward)

    def step_legacy(self, step: int, world: int) -> dict:
        """The predecessor's objective on the trainer's default packs: per-pack token means × n_p / N_raw."""
        loss_fn = learner(step, "per_pack_token_mean").loss_fn(STEPS[step][0])

        def backward():
            for rank in range(world):
                packs, weights, _ = packs_for(step, rank)
                for pack, w in zip(packs, weights):
                    (loss_fn(self.model, pack)[0] * w / world).backward()
            return []

        return self.update(backward)


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


def engine_variants(step: int) -> list[str]:
    """Which ways of feeding this step's segments to the learner the engine runs."""
    if step not in INVARIANCE_STEPS:
        return ["default"]
    rounds = ["rounds_1", "rounds_3"] if STEPS[step][0] == "B" else []
    return list(PACKING) + rounds


def learn_variant(engine, step: int, rank: int, variant: str):
    """One optimizer step through the trainer's StepLearner → (StepResult, packs): the step's segments in
    one round (as Channel-A and rollouts decoded in one call arrive) or in n server rounds."""
    if variant.startswith("rounds_"):
        rounds, change = rounds_for(step, rank, int(variant.split("_")[1])), {}
    else:
        rounds, change = [segments_for(step, rank)[0]], PACKING[variant]
    flagged = [(segs, i == len(rounds) - 1) for i, segs in enumerate(rounds)]
    res, packs, _, _ = learner(step, **change).learn(engine, STEPS[step][0], flagged, N_RAW)
    return res, packs


def run_stage(stage: str, info, tmp: str) -> dict:
    """One engine runs every (step, variant); before each it reloads the initial checkpoint (exact, see
    test_engine_equivalence), so each row is one optimizer step from the same parameters, optimizer and
    LR state, compared with one reference per step, while the engine itself sees the channels alternate."""
    import torch.distributed as dist

    world, rank = info.world_size, info.rank
    model = tiny_model(seed=0)
    init = copy.deepcopy(model) if rank == 0 else None
    t0 = time.time()
    if stage in GRAD_CKPT_STAGES:
        model.gradient_checkpointing_enable()
    opt = optim.build_optimizer(model, **OPT)
    engine = eng.Stage2Engine(
        model,
        opt,
        optim.build_lr_scheduler(opt, TOTAL, WARMUP, "cosine"),
        ds_config(stage),
        max_grad_norm=MAX_GRAD_NORM,
    )
    ckpt = os.path.join(tmp, f"init_z{stage}")
    engine.save(ckpt, "init")
    rows, mine, first = [], [], True
    for step in range(len(STEPS)):
        ref = ref_params = None
        if init is not None:
            reference = Reference(copy.deepcopy(init))
            ref = reference.step(step, world)
            ref_params = params_of(reference.model)
        for variant in engine_variants(step):
            if not first:
                engine.load(ckpt, "init")
            first = False
            res, packs = learn_variant(engine, step, rank, variant)
            state = engine.full_state_dict()  # collective under ZeRO-3
            mine.append(
                {
                    "step": step,
                    "variant": variant,
                    "loss": res.loss,
                    "n_packs": res.n_packs,
                    "n_padding": res.n_padding,
                    "n_packs_max": res.n_packs_max,
                    "segments_per_pack": [p.n_segments for p in packs],
                }
            )
            if init is not None:
                rows.append(
                    {
                        "step": step,
                        "variant": variant,
                        "max_abs": max_abs(state, ref_params),
                        "grad_norm": res.grad_norm,
                        "ref_grad_norm": ref["grad_norm"],
                        "lr": res.lr,
                        "ref_lr": ref["lr"],
                        "ref_rank_losses": ref["rank_losses"],
                        "skipped": res.skipped,
                    }
                )
    all_ranks = [None] * world
    dist.all_gather_object(all_ranks, mine)
    del engine, model
    gc.collect()
    return {
        "accumulation": eng.ACCUMULATION[int(stage)],
        "rows": rows,
        "all_ranks": all_ranks,
        "stage_s": round(time.time() - t0, 2),
    }


def sensitivity(world: int, step: int, **other) -> float:
    """How far the reference moves under the predecessor's per-pack rule on the default packs or, with
    `other` (n_iter=/grad_mode=), under another Channel-A variant."""
    a, b = Reference(tiny_model(0)), Reference(tiny_model(0))
    a.step(step, world)
    if other:
        b.step(step, world, **other)
    else:
        b.step_legacy(step, world)
    return max_abs(params_of(a.model), params_of(b.model))


def main() -> None:
    args = worker_parser("0,1,2,3").parse_args()
    if os.environ.get("CW_BREAK"):  # the deliberate-break checks of the test suite (see the test module)
        _break(os.environ["CW_BREAK"])
    faulthandler.enable()  # a gloo abort (collective mismatch) then shows each rank's Python stack
    torch.set_num_threads(1)
    info = distributed.init_distributed()
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
    distributed.close_distributed()


def _break(what: str) -> None:
    """Deliberately break the trainer's step code in this process, to show the test catches it."""
    from toolkit.trainer import step as step_mod

    if what == "per_pack_weights":  # each rank's packs averaged, whatever their sample counts
        step_mod.pack_weights = lambda packs, n_raw: [1.0 / len(packs)] * len(packs) if packs else []
    elif what == "no_position_ids":  # Channel-B forward without the per-segment positions

        def loss_b(self, module, pack):
            pack = pack.to(self.device)
            logits = module(input_ids=pack.input_ids, use_cache=False).logits
            return step_mod.pack_loss(logits, logits, pack, self.coord_ids, self.loss_weights, self.normalization)

        step_mod.StepLearner.loss_b = loss_b
    elif what == "use_cache_default":  # Channel-B forward without use_cache=False (a cache disables the packed mask)

        def loss_b(self, module, pack):
            pack = pack.to(self.device)
            logits = module(input_ids=pack.input_ids, position_ids=pack.position_ids).logits
            return step_mod.pack_loss(logits, logits, pack, self.coord_ids, self.loss_weights, self.normalization)

        step_mod.StepLearner.loss_b = loss_b
    elif what == "per_pack_token_mean":  # the predecessor's normalization as the default
        global learner
        plain = learner
        learner = lambda step, normalization="per_sample", **change: plain(step, "per_pack_token_mean", **change)  # noqa: E731
    else:
        raise SystemExit(f"unknown CW_BREAK {what!r}")


if __name__ == "__main__":
    main()
