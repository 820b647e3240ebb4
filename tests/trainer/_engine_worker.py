"""Engine worker for tests/trainer/test_engine_equivalence.py: one process per rank (torchrun), or a plain
process for world size 1. Rank 0 writes a JSON report to --out; every check is measured, the test asserts.

Per ZeRO stage it starts two engines: engine A runs the step plan (uneven pack counts across ranks,
flipping, a rank with zero packs, a step with no packs anywhere) against a plain-PyTorch reference on
rank 0, saves a checkpoint after step 1, and (ZeRO-3) generates and exports; engine B starts from a
different init, loads that checkpoint and replays steps 2.. which must match engine A exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import faulthandler
import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # _shared
from _shared import PlainStep  # noqa: E402
from _torchrun import worker_parser, write_report  # noqa: E402

from toolkit.trainer import distributed, optim  # noqa: E402
from toolkit.trainer import engine as eng  # noqa: E402
from toolkit.trainer.export import apply_lora  # noqa: E402

VOCAB, HIDDEN, N_RAW = 96, 32, 4
DEV = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
OPT = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-3)  # eps ≫ |g|: the update scales with g
MAX_GRAD_NORM, WARMUP, TOTAL = 1.0, 2, 5
# PLAN[world][step][rank] = segment count of each pack; every rank holds N_RAW raw samples per step
# (the rest of the N_RAW were "dropped"). Pack counts (3,1) → (1,3) → (0,2) → (0,0).
PLAN = {
    1: [[[2, 1, 1]], [[1, 2, 1]], [[2, 2]], [[]]],
    2: [[[2, 1, 1], [3]], [[4], [1, 2, 1]], [[], [2, 2]], [[], []]],
}
GRAD_CKPT_STAGES = {"2", "3", "3o"}
TWO_PASS_STEPS = {
    int(x) for x in os.environ.get("EW_TWO_PASS", "1").split(",") if x
}  # step index whose loss runs two forwards (the Channel-A soft-context pattern)


def tiny_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).float().to(DEV)


@dataclasses.dataclass(frozen=True)
class Pack:
    """A dataclass like the trainer's collated packs (the padding broadcast must rebuild it)."""

    input_ids: torch.Tensor
    token_weights: torch.Tensor
    n_segments: int
    two_pass: bool

    def __getitem__(self, key):
        return getattr(self, key)


def make_pack(step: int, rank: int, index: int, n_seg: int) -> Pack:
    g = torch.Generator().manual_seed(100_000 * step + 1000 * rank + index)
    length = 4 + 3 * n_seg + int(torch.randint(0, 4, (1,), generator=g))
    ids = torch.randint(3, VOCAB, (1, length), generator=g)
    weights = torch.randint(0, 3, (1, length), generator=g).float() / 2
    weights[:, -1] = 1.0  # at least one supervised token
    return Pack(ids, weights, n_seg, step in TWO_PASS_STEPS)


def packs_for(world: int, step: int, rank: int) -> list[Pack]:
    return [make_pack(step, rank, i, n) for i, n in enumerate(PLAN[world][step][rank])]


def weighted_ce(logits, pack):
    ce = F.cross_entropy(logits[0, :-1].float(), pack["input_ids"][0, 1:].to(DEV), reduction="none")
    w = pack["token_weights"][0, 1:].to(DEV)
    return (ce * w).sum() / w.sum()


def loss_fn(model, pack):
    """Per-token weighted CE; two_pass packs add a second forward on expected-embedding inputs."""
    out = model(input_ids=pack["input_ids"].to(DEV))
    loss = weighted_ce(out.logits, pack)
    if pack["two_pass"]:
        embed = getattr(model, "module", model).get_input_embeddings()
        base = embed(pack["input_ids"].to(DEV))
        table = embed(torch.arange(VOCAB, device=DEV))  # through the module, so ZeRO-3 gathers it
        expected = torch.softmax(out.logits[:, :-1], -1) @ table
        mixed = torch.cat([base[:, :1], 0.5 * base[:, 1:] + 0.5 * expected], dim=1)
        loss = loss + 0.5 * weighted_ce(model(inputs_embeds=mixed).logits, pack)
    return loss, {"tokens": int(pack["input_ids"].numel())}


def ds_config(stage: str) -> dict:
    """The shipped ds_configs/ file; ZeRO-3 with persistence threshold 0, so the tiny model really partitions."""
    name = "zero3_offload" if stage == "3o" else f"zero{stage}"
    with open(os.path.join(ROOT, "ds_configs", f"{name}.json")) as fh:
        cfg = json.load(fh)
    if stage.startswith("3"):
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return cfg


def build(model, stage: str) -> eng.Stage2Engine:
    if stage in GRAD_CKPT_STAGES:
        model.gradient_checkpointing_enable()  # recompute in backward: exact, and the real runs use it
    opt = optim.build_optimizer(model, **OPT)
    sched = optim.build_lr_scheduler(opt, TOTAL, WARMUP, "cosine")
    override = dict(kv.split(":") for kv in os.environ.get("EW_ACCUMULATION", "").split(",") if kv)
    return eng.Stage2Engine(
        model, opt, sched, ds_config(stage), max_grad_norm=MAX_GRAD_NORM, accumulation=override.get(stage)
    )


class Reference(PlainStep):
    """Plain PyTorch: same init, all ranks' packs, weights n_p / N_raw_total, clip, AdamW, LambdaLR."""

    def __init__(self, model):
        super().__init__(model, OPT, TOTAL, WARMUP, MAX_GRAD_NORM)

    def step(self, per_rank: list[list[dict]], weight_of) -> dict:
        if not any(per_rank):  # nothing to train anywhere: no update, the schedule still advances
            lr = self.opt.param_groups[0]["lr"]
            self.sched.step()
            return {"rank_losses": [0.0] * len(per_rank), "grad_norm": None, "lr": lr}

        def backward():
            rank_losses = []
            for packs in per_rank:
                total = 0.0
                for pack in packs:
                    loss, _ = loss_fn(self.model, pack)
                    (loss * weight_of(pack, packs, len(per_rank))).backward()
                    total += float(loss.detach()) * pack["n_segments"] / N_RAW
                rank_losses.append(total)
            return rank_losses

        return self.update(backward)


def global_mean_weight(pack, packs, world):
    return pack["n_segments"] / (N_RAW * world)


def max_abs(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].float().cpu() - b[k].float().cpu()).abs().max()) for k in a)


def ref_params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def plain_params(model) -> dict:
    """HF-named tensors of a reference model (a peft model is merged on a copy)."""
    if hasattr(model, "peft_config"):
        model = copy.deepcopy(model).merge_and_unload()
    return ref_params(model)


def run_plan(engine, world, rank, steps, reference=None) -> list[tuple[dict, dict]]:
    out = []
    for step in steps:
        res = engine.train_step(
            packs := packs_for(world, step, rank), loss_fn, [p["n_segments"] / N_RAW for p in packs]
        )
        sd = engine.full_state_dict()
        row = {
            "step": step,
            "loss": res.loss,
            "grad_norm": res.grad_norm,
            "lr": res.lr,
            "skipped": res.skipped,
            "n_packs": res.n_packs,
            "n_padding": res.n_padding,
            "n_packs_max": res.n_packs_max,
        }
        if reference is not None:
            ref = reference.step([packs_for(world, step, r) for r in range(world)], global_mean_weight)
            row.update(
                max_abs=max_abs(sd, plain_params(reference.model)),
                ref_rank_losses=ref["rank_losses"],
                ref_grad_norm=ref["grad_norm"],
                ref_lr=ref["lr"],
            )
        out.append((row, sd))
    return out


def gather_rows(rows):
    """Every rank's step rows, for the pack-count and loss checks (all_gather_object: collective)."""
    import torch.distributed as dist

    bucket = [None] * dist.get_world_size()
    dist.all_gather_object(bucket, rows)
    return bucket


def check_generation(engine, reference, rank) -> dict:
    prompt = torch.tensor([[1, 5, 9, 13]], device=DEV)
    new = 6 if rank == 0 else 2  # ranks run different numbers of forwards
    with engine.generation_context() as module:
        got = module.generate(input_ids=prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)
    if reference is None:
        return {}
    want = reference.model.generate(input_ids=prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return {"generate_equal": got.tolist() == want.tolist(), "generate_tokens": got.tolist()}


def check_export(engine, reference, rank, directory) -> dict:
    engine.export_hf(directory)
    if reference is None:
        return {}
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    saved = {k: v for f in files for k, v in load_file(os.path.join(directory, f)).items()}
    live = ref_params(reference.model)
    loaded = LlamaForCausalLM.from_pretrained(directory).float().eval()
    ids = torch.tensor([[1, 7, 11, 20, 33]])
    with torch.no_grad():
        want = reference.model.eval()(ids.to(DEV)).logits.cpu()
        logit_delta = float((loaded(ids).logits - want).abs().max())
    reference.model.train()
    return {
        "export_files": files,
        "export_numel": sum(v.numel() for v in saved.values()),
        "live_numel": sum(v.numel() for v in live.values()),
        "export_max_abs": max_abs(saved, live),
        "export_logits_max_abs": logit_delta,
    }


def run_stage(stage: str, info, tmp: str) -> dict:
    world, rank = info.world_size, info.rank
    steps = list(range(len(PLAN[world])))
    model = tiny_model(seed=0)
    reference = Reference(copy.deepcopy(model)) if rank == 0 else None
    t0 = time.time()
    engine = build(model, stage)
    report = {"accumulation": engine.accumulation, "init_s": round(time.time() - t0, 2)}
    ckpt = os.path.join(tmp, f"ckpt_z{stage}")
    if stage == "3":  # before any step the ZeRO-3 trace is incomplete: hooks left on would deadlock here
        report["generate_first_equal"] = check_generation(engine, reference, rank).get("generate_equal")
    first = run_plan(engine, world, rank, steps[:1], reference)
    engine.save(ckpt, "s1", {"step": 1, "note": "client state"})
    rest = run_plan(engine, world, rank, steps[1:], reference)
    rows = [r for r, _ in first + rest]
    report["steps"] = rows
    report["all_ranks"] = gather_rows(
        [{k: r[k] for k in ("loss", "n_packs", "n_padding", "n_packs_max")} for r in rows]
    )
    if stage == "3":
        report.update(check_generation(engine, reference, rank))
        report.update(check_export(engine, reference, rank, os.path.join(tmp, "export_z3")))
    final_a = rest[-1][1]
    del engine, model
    gc.collect()
    # Engine B: different init, resume from step 1, replay steps 2.. → identical to engine A.
    engine_b = build(tiny_model(seed=1), stage)
    client = engine_b.load(ckpt, "s1")
    resumed = run_plan(engine_b, world, rank, steps[1:])
    report["resume"] = {
        "client_state": client,
        "max_abs": max_abs(resumed[-1][1], final_a),
        "losses_a": [r["loss"] for r, _ in rest],
        "losses_b": [r["loss"] for r, _ in resumed],
        "lrs_a": [r["lr"] for r, _ in rest],
        "lrs_b": [r["lr"] for r, _ in resumed],
    }
    del engine_b
    gc.collect()
    report["stage_s"] = round(time.time() - t0, 2)
    return report


def run_bf16(stage: str, info) -> dict:
    """bf16 (DeepSpeed `bf16.enabled`) over the same uneven plan: no deadlock, close to the fp32 reference."""
    world, rank = info.world_size, info.rank
    model = tiny_model(seed=0)
    reference = Reference(copy.deepcopy(model)) if rank == 0 else None
    opt = optim.build_optimizer(model, **OPT)
    sched = optim.build_lr_scheduler(opt, TOTAL, WARMUP, "cosine")
    cfg = {**ds_config(stage), "bf16": {"enabled": True}}
    engine = eng.Stage2Engine(model, opt, sched, cfg, max_grad_norm=MAX_GRAD_NORM)
    rows = run_plan(engine, world, rank, range(len(PLAN[world])), reference)
    del engine
    gc.collect()
    return {
        "optimizer_dtype": str(next(iter(rows[-1][1].values())).dtype),
        "max_abs": [r["max_abs"] for r, _ in rows] if reference is not None else None,
        "grad_norm": [r["grad_norm"] for r, _ in rows],
    }


def sensitivity(world: int) -> float:
    """How far a plausible wrong weighting (mean over this rank's packs) lands from the right one."""
    a, b = Reference(tiny_model(0)), Reference(tiny_model(0))
    per_rank = [packs_for(world, 0, r) for r in range(world)]
    a.step(per_rank, global_mean_weight)
    b.step(per_rank, lambda pack, packs, w: 1.0 / (len(packs) * w))
    return max_abs(ref_params(a.model), ref_params(b.model))


def run_lora(info, tmp: str) -> dict:
    """LoRA under ZeRO-3: one uneven step equals plain peft; the export is merged and loads as plain HF."""
    world, rank = info.world_size, info.rank
    torch.manual_seed(7)
    model = apply_lora(tiny_model(seed=0), rank=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():  # B starts at zero; make the adapters matter from step 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO-3 partitions
    reference = Reference(copy.deepcopy(model)) if rank == 0 else None
    engine = build(model, "3")
    live_before = {k: v.clone() for k, v in engine.full_state_dict().items()}
    rows = run_plan(engine, world, rank, [0], reference)
    report = {"trainable": trainable}
    report.update(check_generation(engine, reference, rank))  # peft module.generate under ZeRO-3
    directory = os.path.join(tmp, "export_lora")
    engine.export_hf(directory)
    again = engine.full_state_dict()
    report["merge_leaves_live_weights"] = max_abs(again, rows[0][1]) == 0.0
    report["params_changed"] = max_abs(live_before, rows[0][1]) > 0
    if reference is not None:
        from transformers import LlamaForCausalLM

        report["step_max_abs"] = rows[0][0]["max_abs"]
        loaded = LlamaForCausalLM.from_pretrained(directory).float().eval()
        ids = torch.tensor([[1, 7, 11, 20, 33, 4]])
        with torch.no_grad():
            want = reference.model.eval()(input_ids=ids.to(DEV)).logits.cpu()
            report["export_logits_max_abs"] = float((loaded(ids).logits - want).abs().max())
        report["export_has_lora_keys"] = any("lora" in k for k in loaded.state_dict())
    del engine
    gc.collect()
    return report


def main() -> None:
    parser = worker_parser("0,1,2,3")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--bf16-stages", default="", help="comma list of stages to smoke-test in bf16")
    args = parser.parse_args()
    faulthandler.enable()  # a gloo abort (collective mismatch) then shows each rank's Python stack
    torch.set_num_threads(1)
    info = distributed.init_distributed()
    t0 = time.time()
    report = {"world": info.world_size, "backend": info.backend, "stages": {}}
    if info.rank == 0:
        report["sensitivity"] = sensitivity(info.world_size)
    for stage in [s for s in args.stages.split(",") if s]:
        report["stages"][stage] = run_stage(stage, info, args.tmp)
    if args.lora:
        report["lora"] = run_lora(info, args.tmp)
    report["bf16"] = {stage: run_bf16(stage, info) for stage in args.bf16_stages.split(",") if stage}
    report["wall_s"] = round(time.time() - t0, 2)
    write_report(report, args.out, info.rank)
    distributed.close_distributed()


if __name__ == "__main__":
    main()
