"""Stage2Trainer — the recipe: setup → train (step: schedule → budget → channel → pack → backward → step)
→ validate → save_checkpoint → cleanup.

Reads only the frozen ResolvedConfig. Channel-A and Channel-B are helpers it calls, not subclasses.
Collectives happen at fixed places in `train_step` (engine step, one metrics reduction, one stop-flag
reduction), never inside logging or rank-dependent branches. A step's segments reach the learner in rounds
(`StepLearner.learn`): one round for Channel-A and for rollouts decoded in one call; in vLLM server mode one
per server round (one pack-count all-reduce per round, same on every rank), learned while the next decodes.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import torch

from toolkit import runlayout
from toolkit.data.tokenizer import load_tokenizer
from toolkit.model_source import from_pretrained
from toolkit.rollout.backends.build import build_backend
from toolkit.rollout.codec import HFTokenCodec
from toolkit.rollout.targets import Drop, build_channel_a_segment
from toolkit.trainer import checkpoint as ckpt
from toolkit.trainer import dumps
from toolkit.trainer.attention import register as register_attention
from toolkit.trainer.budget import StepBudget
from toolkit.trainer.channel_b import ChannelBSettings, channel_b_rounds, with_images
from toolkit.trainer.distributed import init_distributed
from toolkit.trainer.engine import Stage2Engine
from toolkit.trainer.evaluate import run_eval
from toolkit.trainer.export import apply_lora, copy_support_files
from toolkit.trainer.metrics import MetricsWriter, StepMetrics, reduce_metrics
from toolkit.trainer.optim import build_lr_scheduler, build_optimizer, reapply_schedule
from toolkit.trainer.run_info import provenance, sample_digest, summary
from toolkit.trainer.samples import SampleInput, load_samples
from toolkit.trainer.scheduler import channel_for_step
from toolkit.trainer.step import StepLearner
from toolkit.trainer.wandb_log import with_wandb
from toolkit.vlm.inputs import VisionProcessor, image_pad_id

log = logging.getLogger(__name__)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stage2Trainer:
    def __init__(self, cfg, resume: str | None = None):
        self.cfg = cfg
        self.resume = resume
        self.stop_signum = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed(cfg.training.collective_timeout_s)
        torch.manual_seed(cfg.training.seed)
        self.device = torch.device("cuda", self.dist.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        self.out_dir = Path(cfg.training.output_dir)
        # A missing path or an unreachable hub said plainly, before any hub client retries (model_source.py).
        self.tok = from_pretrained(load_tokenizer, cfg.model.model)
        self.codec = HFTokenCodec(self.tok)
        # A Qwen-VL model folder: images are patched by its own processor, positions are M-RoPE.
        self.vision = VisionProcessor(cfg.model.model) if image_pad_id(cfg.model.model) is not None else None
        self.mrope = (self.vision.pad_id, self.vision.merge) if self.vision else None
        self.train_set = self._setup_data(cfg.data.train_jsonl, cfg.data.train_sample_limit)
        self.val_set = self._setup_data(cfg.data.val_jsonl, cfg.data.val_sample_limit) if cfg.data.val_jsonl else []
        self.budget = StepBudget.from_config(cfg, len(self.train_set), self.dist.world_size, self.dist.rank)
        self.total_steps = self.budget.total_steps(cfg.training.num_train_epochs, cfg.training.max_steps)
        self.engine = self._setup_engine()
        self.backend = self._setup_backend()
        # Server mode: Channel-B learns each server round while the next decodes unless vllm.server.overlap
        # is false (other backends hand a step's rollouts over as one round: nothing decodes meanwhile).
        self.overlap_b = cfg.settings.server.overlap
        self.channel_b = ChannelBSettings.from_config(cfg)
        self.coord_ids = torch.tensor(self.codec.coord_token_ids, dtype=torch.long, device=self.device)
        # data.poly_policy "drop": how many poly objects each file lost (logged on load, written every step).
        self.data_metrics = {
            "data/train_poly_dropped": sum(s.dropped_poly for s in self.train_set),
            "data/val_poly_dropped": sum(s.dropped_poly for s in self.val_set),
        }
        self.learner = StepLearner.from_config(cfg, self.coord_ids, self.device, vision=self.vision, mrope=self.mrope)
        self.state = ckpt.TrainerState(metric_name=cfg.training.metric_for_best_model)
        self._maybe_resume()
        self.writer = self._setup_writer()
        # Graceful handlers (finish the step, checkpoint) only now: during setup (minutes on a real model)
        # toolkit/train.py's start-up handlers stop at once on SIGTERM/SIGINT (nothing to save yet) and
        # hand a SIGUSR1 over to stop_signum.
        self._install_signal_handlers()
        if self.dist.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / runlayout.RESOLVED_CONFIG).write_text(cfg.to_yaml(provenance()))
        log.info(
            "rank %d/%d: %d train / %d val records, %d steps, GAS %d, %d raw samples per rank per step",
            self.dist.rank,
            self.dist.world_size,
            len(self.train_set),
            len(self.val_set),
            self.total_steps,
            self.budget.gradient_accumulation_steps,
            len(self.budget.step_indices(0)),
        )

    def _setup_data(self, path: str, limit: int | None) -> list[SampleInput]:
        """Records → prompt ids once; prompts never change during training."""
        d = self.cfg.data
        return load_samples(
            path,
            self.tok,
            limit=limit,
            system=self.cfg.template.system_prompt,
            vision=self.vision,
            image_root=d.image_root,
            bbox_format=d.bbox_format,
            poly_policy=d.poly_policy,
        )

    def _setup_backend(self):
        """The rollout backend the profile asks for, decoding with the learner's weights."""
        # vLLM backends take the learner's gathered weights (LoRA merged; a collective under ZeRO-3, so every rank
        # joins each sync and the start-up name check); HF decodes with the module under ZeRO-3's gather context.
        return build_backend(
            self.cfg,
            self.codec,
            module=self.engine.module,
            pad_id=self.tok.pad_token_id,
            weights=self.engine.named_full_params,
            device=self.device,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            vision=self.vision,
            generation_context=self.engine.generation_context,
        )

    def _setup_writer(self):
        """metrics.jsonl / TensorBoard (MetricsWriter), W&B on top when training.report_to asks; after resume."""
        tr = self.cfg.training
        writer = MetricsWriter(
            self.out_dir, tr.logging_dir, self.dist.rank, sinks=tr.report_to, resume_step=self.state.step
        )
        return with_wandb(writer, self.cfg, self.dist.rank, self.out_dir, resumed=self.state.step > 0)

    def _setup_engine(self) -> Stage2Engine:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        cfg, tr = self.cfg, self.cfg.training
        register_attention()  # model.attn_impl sdpa_packed
        model_cls = AutoModelForImageTextToText if self.vision else AutoModelForCausalLM
        model = from_pretrained(
            model_cls.from_pretrained,
            cfg.model.model,
            dtype=getattr(torch, cfg.model.torch_dtype),
            attn_implementation=cfg.model.attn_impl,
        )
        if cfg.tuner.train_type in ("lora", "dora"):
            tu = cfg.tuner
            model = apply_lora(
                model, tu.lora_rank, tu.lora_alpha, tu.lora_dropout, tu.target_modules, use_dora=tu.train_type == "dora"
            )
        if tr.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        # tuner.freeze_vit / freeze_aligner freeze those modules (lr 0 → not trained, not in the optimizer).
        vit_lr = 0.0 if cfg.tuner.freeze_vit else tr.vit_lr
        aligner_lr = 0.0 if cfg.tuner.freeze_aligner else tr.aligner_lr
        optimizer = build_optimizer(
            model,
            lr=tr.learning_rate,
            vit_lr=vit_lr,
            aligner_lr=aligner_lr,
            weight_decay=tr.weight_decay,
            betas=(tr.adam_beta1, tr.adam_beta2),
            eps=tr.adam_epsilon,
        )
        sched = build_lr_scheduler(
            optimizer, self.total_steps, int(tr.warmup_ratio * self.total_steps), tr.lr_scheduler_type
        )
        from toolkit.config import load_ds_config

        ds_config = (
            load_ds_config(cfg.deepspeed.config) if cfg.deepspeed.enabled else {"zero_optimization": {"stage": 0}}
        )
        if cfg.model.torch_dtype == "bfloat16":
            ds_config = {**ds_config, "bf16": {"enabled": True}}
        return Stage2Engine(model, optimizer, sched, ds_config, max_grad_norm=tr.max_grad_norm)

    def _maybe_resume(self) -> None:
        path = ckpt.find_resume_dir(self.cfg.training.output_dir, self.resume)
        if path is None:
            if self.resume:
                log.info("--resume %s: no complete checkpoint under %s; starting fresh", self.resume, self.out_dir)
            return
        # Every file is checked before DeepSpeed's pickle loader sees one (docs/STAGE2_RUNBOOK.md, Security model).
        ckpt.check_deepspeed_files(path / runlayout.CHECKPOINT_DS)
        rng, state = ckpt.read_rng(path, self.dist.rank), ckpt.read_state(path)
        self.engine.load(path / runlayout.CHECKPOINT_DS)
        ckpt.set_rng(rng)
        self.state = state
        # A larger training.max_steps on resume: continue on the schedule planned with the new total.
        reapply_schedule(self.engine.engine.lr_scheduler)
        log.info("resumed from %s after step %d of %d", path, self.state.step, self.total_steps)

    # ------------------------------------------------------------------ train
    def train(self) -> int:
        """Run to total_steps or a stop signal. Returns the process exit code (0, or 128 + signal)."""
        from toolkit.trainer.console import StepBar

        tr = self.cfg.training
        bar = StepBar(self.total_steps, self.state.step, self.dist.rank)  # logs above the bar (console.py)
        while self.state.step < self.total_steps:
            index = self.state.step  # 0-based: seeds, data cursor and A/B schedule are functions of it
            metrics = self.train_step(index)
            # From here on a step is named by the optimizer steps completed (as HF/TRL log it): the console,
            # metrics.jsonl, TensorBoard, eval, checkpoints and signal messages all say `done`.
            self.state.step = done = index + 1
            if tr.eval_strategy == "steps" and self.val_set and done % tr.eval_steps == 0:
                metrics.update(self.validate(done))
            channel = channel_for_step(index, self.cfg.stage2_ab.schedule.b_ratio)
            metrics.update(self.data_metrics)
            self.writer.write(done, channel, metrics)
            if self.dist.rank == 0 and done % tr.logging_steps == 0:
                log.info("step %d/%d [%s] %s", done, self.total_steps, channel, summary(metrics))
            bar.update(1)
            bar.set_postfix(
                {k.split("/")[-1]: f"{metrics[k]:.3g}" for k in ("loss/total", "rollout/f1") if k in metrics}
            )
            stop = self._agree_to_stop()
            due = tr.save_strategy == "steps" and done % tr.save_steps == 0
            if due or stop or done == self.total_steps:
                self.save_checkpoint(metrics)
            if stop:
                log.warning(
                    "stopping after step %d on signal %d (checkpoint %s written)",
                    done,
                    self.stop_signum,
                    runlayout.checkpoint_dir(self.out_dir, done).name,
                )
                bar.close()
                return 128 + (self.stop_signum or signal.SIGTERM)
        bar.close()
        return 0

    def train_step(self, step: int) -> dict:
        """One optimizer step on one channel: this rank's E/W raw samples, learned round by round."""
        t0 = time.perf_counter()
        channel = channel_for_step(step, self.cfg.stage2_ab.schedule.b_ratio)
        self.state.b_steps += channel == "B"
        samples = [self.train_set[i] for i in self.budget.step_indices(step)]
        m = StepMetrics()
        rounds = self._rounds(channel, samples, step, m)
        res, packs, n_segments, learn_s = self.learner.learn(self.engine, channel, rounds, n_raw=len(samples))
        m.time("time/build_segments_s", time.perf_counter() - t0 - learn_s)  # Channel-B: rollouts included
        m.time("time/forward_backward_s", learn_s)  # packing and the optimizer step included
        self._step_metrics(m, res, packs, channel, step, n_raw=len(samples), n_segments=n_segments)
        m.add_sum("stage2/sample_digest", sample_digest(s.sample_id for s in samples))
        m.time("time/step_s", time.perf_counter() - t0)
        return reduce_metrics(m)

    def _rounds(self, channel: str, samples: list[SampleInput], step: int, m: StepMetrics):
        """The step's segments as rounds of (segments, last): Channel-A in one; Channel-B as the backend hands
        its rollouts over (one round, or one per vLLM server round, decoded while the previous one learns)."""
        if channel == "A":
            return [(self._channel_a_segments(samples, m), True)]
        dump_to = self.out_dir if dumps.due(self.channel_b.monitor, step, self.dist.rank) else None
        return channel_b_rounds(
            self.backend, samples, step, self.codec, m, self.channel_b, background=self.overlap_b, dump_to=dump_to
        )

    def _step_metrics(
        self, m: StepMetrics, res, packs, channel: str, step: int, *, n_raw: int, n_segments: int
    ) -> None:
        """The learner's loss, optimizer and packing facts (`StepLearner.add_metrics`), schedule bookkeeping."""
        self.learner.add_metrics(m, res, packs)
        m.add_sum("stage2/raw_samples", n_raw)
        m.add_sum("stage2/segments", n_segments)
        m.add_sum("stage2/dropped_samples", n_raw - n_segments)
        m.add_max("stage2/channel_b", float(channel == "B"))
        m.add_max("stage2/channel_a", float(channel == "A"))
        m.add_max("stage2_ab/b_ratio_realized", self.state.b_steps / (step + 1))
        m.add_max("train/epoch", self.budget.epoch_of(step + 1))

    def _channel_a_segments(self, samples: list[SampleInput], m: StepMetrics) -> list:
        t = self.cfg.template
        segs = []
        for s in samples:
            seg = build_channel_a_segment(
                s.prompt_ids,
                s.gt_objects,
                self.codec,
                field_order=t.object_field_order,
                ordering=t.object_ordering,
                desc_ce_weight=self.cfg.stage2_ab.desc_ce_weight,
                sample_id=s.sample_id,
                max_len=self.cfg.global_max_length,
            )
            seg = with_images(seg, s)
            for key, value in seg.meta.items():
                m.add_sum(key, value)
            if isinstance(seg, Drop):
                m.count(f"stage2/drop/{seg.reason}")
            else:
                segs.append(seg)
        return segs

    # ------------------------------------------------------------------ eval
    def validate(self, step: int) -> dict:
        """Rollout eval on this rank's shard of the val set: rollout → parse → match, no teacher forcing
        (the function `stage2 eval` calls); rank 0 draws its first few samples (toolkit/trainer/draw.py)."""
        from toolkit.trainer.draw import N_PICTURES, PictureLog

        res = run_eval(
            self.backend,
            self.val_set,
            self.codec,
            self.cfg.settings,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            step=step,
            keep=N_PICTURES,
            progress=True,
        )
        if self.dist.rank == 0:
            if not hasattr(self, "pictures"):
                tr = self.cfg.training
                self.pictures = PictureLog(self.out_dir, tr.logging_dir, "tensorboard" in tr.report_to)
            paths = self.pictures.write(step, res.records)
            if hasattr(self.writer, "wandb"):  # W&B gets them with this step's metrics
                self.writer.wandb.add_pictures(
                    {f"eval_pictures/{r['sample_id']}": p for r, p in zip(res.records, paths)}
                )
        return res.metrics

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, metrics: dict) -> Path:
        tr = self.cfg.training
        path = runlayout.checkpoint_dir(self.out_dir, self.state.step)
        self.engine.save(path / runlayout.CHECKPOINT_DS, tag=f"global_step{self.state.step}")
        ckpt.save_rng(path, self.dist.rank)
        self.engine.export_hf(path / runlayout.CHECKPOINT_HF, tokenizer=self.tok)
        if self.dist.rank == 0:
            copy_support_files(self.cfg.model.model, path / runlayout.CHECKPOINT_HF)
        # With a rollout eval configured only its values rank checkpoints (a checkpoint taken between evals
        # does not); without one, the training batch's value does. Named as logged.
        evaluates = tr.eval_strategy == "steps" and bool(self.val_set)
        key = ("eval_" if evaluates else "") + tr.metric_for_best_model
        key = key if key in metrics else None
        if key is not None:
            score = float(metrics[key])
            if self.state.improved(score, tr.greater_is_better):
                self.state.best_metric, self.state.best_step, self.state.metric_name = score, self.state.step, key
            self.state.history.append([self.state.step, score])
        self.engine.barrier()
        if self.dist.rank == 0:
            ckpt.write_state(path, self.state)
            best = runlayout.checkpoint_dir(self.out_dir, self.state.best_step) if self.state.best_step else None
            ckpt.rotate(self.out_dir, tr.save_total_limit, protect={best} if best else set(), run_id=self.state.run_id)
            log.info("checkpoint written: %s (%s)", path, self._best_text())
        self.engine.barrier()
        return path

    def _best_text(self) -> str:
        if self.state.best_step is None:
            return f"no {self.cfg.training.metric_for_best_model} measured yet"
        return f"best {self.state.metric_name}={self.state.best_metric:.4g} at step {self.state.best_step}"

    # ------------------------------------------------------------------ signals / cleanup
    def _install_signal_handlers(self) -> None:
        def on_signal(signum, _frame):
            self.stop_signum = signum
            log.warning("signal %d received: finishing the current step, then checkpointing", signum)

        for sig in STOP_SIGNALS:
            signal.signal(sig, on_signal)

    def _agree_to_stop(self) -> bool:
        """All ranks stop at the same step if any rank got a signal (one small all_reduce per step)."""
        flag = self.engine.all_reduce_max(float(self.stop_signum))
        if flag and not self.stop_signum:
            self.stop_signum = int(flag)
        return bool(flag)

    def cleanup(self, clean: bool = True) -> None:
        """Release what setup created, also after a failed setup (so the real error is what the user sees).
        clean=False (an error): no exit barrier, whose peer may be the one that is gone."""
        from toolkit.trainer.distributed import close_distributed

        for part in ("backend", "writer", "pictures"):
            if hasattr(self, part):
                getattr(self, part).close()
        close_distributed(barrier=clean)
