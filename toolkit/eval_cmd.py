"""`stage2 eval`: score any checkpoint on a profile's val set with the training loop's own eval.

    stage2 eval --profile smoke/ab_mixed --checkpoint assets/stage1 --limit 16
    stage2 eval -p smoke/ab_mixed --checkpoint output/stage2_ab/smoke/ab_mixed/checkpoints/step-000100
    stage2 eval -p prod/ab_mixed --checkpoint RUN_DIR --backend vllm --out /tmp/eval

The checkpoint may be a model folder (a Stage-1 folder, a `checkpoints/step-*/hf` export), a Stage-2
checkpoint `step-*` (its `hf/` is used), a run's output_dir (its newest complete checkpoint) or a peft
LoRA/DoRA adapter folder (`adapter_config.json`; the base is the adapter's base model, else `model.model`).
Scoring is `toolkit.trainer.evaluate.run_eval`, the function the training loop's eval calls, so the
numbers are the `eval_rollout/*` ones training logs. Writes into --out: eval.json (metrics by name),
predictions.jsonl (one line per val sample: rollout, parsed objects, GT, matches) and pictures/*.png.
Importing this module is cheap: torch and transformers are imported when the command runs.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from toolkit.cli_options import profile_options, resolve_profile
from toolkit.runlayout import CHECKPOINT_HF, EVAL, complete_checkpoints

log = logging.getLogger(__name__)
TABLE_KEYS = (
    "eval_rollout/f1",
    "eval_rollout/precision",
    "eval_rollout/recall",
    "eval_rollout/class50/f1",
    "eval_rollout/matched_iou_mean",
    "eval_rollout/valid_json_rate",
    "eval_rollout/parse_truncated_rate",
    "eval_rollout/rollout_len_mean",
    "eval_rollout/samples",
    "eval_rollout/runtime_s",
)


class EvalError(click.ClickException):
    """A bad --checkpoint or a model that cannot be loaded: one message, exit 1."""


@dataclass
class Checkpoint:
    """Where the weights come from: a from_pretrained folder (or hub id), plus a peft adapter folder."""

    model: str
    adapter: str | None = None
    step: int = 0  # the training step, when the path names one (seeds sampling like that step's eval)


def resolve_checkpoint(path: str, base_model: str) -> Checkpoint:
    """Turn --checkpoint into a loadable model folder (see the module docstring for the accepted forms)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(f"--checkpoint {path}: no such folder ({p.resolve()})")
    step = _step_of(p)
    if (p / "adapter_config.json").is_file():
        cfg = json.loads((p / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path") or base_model
        if not Path(base).exists():
            base = base_model  # the adapter was trained elsewhere: use the profile's model.model
        return Checkpoint(base, str(p), step)
    if (p / "config.json").is_file():
        return Checkpoint(str(p), None, step)
    if (p / CHECKPOINT_HF / "config.json").is_file():
        return Checkpoint(str(p / CHECKPOINT_HF), None, step)
    found = [c for c in complete_checkpoints(p) if (c / CHECKPOINT_HF / "config.json").is_file()]
    if found:
        log.info("--checkpoint %s is a run folder: evaluating its newest checkpoint %s", path, found[-1].name)
        return Checkpoint(str(found[-1] / CHECKPOINT_HF), None, _step_of(found[-1]))
    raise EvalError(
        f"--checkpoint {path}: not a model folder (no config.json), a checkpoints/step-*/ folder "
        "(no hf/config.json), a run folder (no complete checkpoints/step-*/hf) nor a LoRA adapter "
        "(no adapter_config.json)"
    )


def _step_of(p: Path) -> int:
    m = next((re.fullmatch(r"step-(\d+)", part) for part in reversed(p.parts) if part.startswith("step-")), None)
    return int(m.group(1)) if m else 0


def default_out(cfg, checkpoint: str) -> Path:
    """<training.output_dir>/eval/<checkpoint path tail>: beside the run, never inside a model folder."""
    tail = "_".join(Path(checkpoint).resolve().parts[-2:])
    return Path(cfg.training.output_dir) / EVAL / re.sub(r"[^A-Za-z0-9._-]+", "_", tail)


def load_model(ck: Checkpoint, cfg, vision: bool):
    """The HF model of `ck` (adapter applied and merged), in eval mode, on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from toolkit.model_source import from_pretrained
    from toolkit.trainer.attention import register as register_attention

    register_attention()  # model.attn_impl sdpa_packed
    cls = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = from_pretrained(
        cls.from_pretrained,
        ck.model,
        "model.model" if ck.adapter else "--checkpoint",
        dtype=getattr(torch, cfg.model.torch_dtype),
        attn_implementation=cfg.model.attn_impl,
    )
    if ck.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ck.adapter).merge_and_unload()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return model.to(device).eval(), device


def open_backend(name: str, ck: Checkpoint, cfg, tok, codec, vision, out: Path):
    """The --backend for `ck`: hf on the loaded model, or vllm as an in-process engine (never the profile's servers)."""
    from toolkit.rollout.backends.build import build_backend

    if name == "vllm":
        model_dir = ck.model
        if ck.adapter:  # vLLM loads a folder: merge the adapter into one first
            model, _ = load_model(ck, cfg, vision is not None)
            model_dir = str(out / "merged_model")
            model.save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
        return build_backend(cfg, codec, kind="colocate", model_dir=model_dir)
    model, device = load_model(ck, cfg, vision is not None)
    return build_backend(cfg, codec, kind="hf", module=model, pad_id=tok.pad_token_id, device=device, vision=vision)


def evaluate_checkpoint(
    cfg, checkpoint: str, backend_name: str, limit: int | None, out: Path | None, pictures: int
) -> tuple[dict, Path]:
    """Load, decode, score and write eval.json / predictions.jsonl / pictures; returns (metrics, out)."""
    from toolkit.data.tokenizer import load_tokenizer
    from toolkit.model_source import from_pretrained
    from toolkit.rollout.codec import HFTokenCodec
    from toolkit.trainer.draw import write_pngs
    from toolkit.trainer.evaluate import run_eval
    from toolkit.trainer.samples import load_samples
    from toolkit.vlm.inputs import VisionProcessor, image_pad_id

    if not cfg.data.val_jsonl:
        raise EvalError(
            "data.val_jsonl is not set in the profile: `stage2 eval` scores the profile's val set "
            "(fix: --set data.val_jsonl=PATH)"
        )
    ck = resolve_checkpoint(checkpoint, cfg.model.model)
    key = "model.model" if ck.model == cfg.model.model else "--checkpoint"
    tok_dir = ck.adapter if ck.adapter and (Path(ck.adapter) / "tokenizer.json").is_file() else ck.model
    tok = from_pretrained(load_tokenizer, tok_dir, key)
    codec = HFTokenCodec(tok)
    vision = VisionProcessor(ck.model) if image_pad_id(ck.model) is not None else None
    d = cfg.data
    val = load_samples(
        d.val_jsonl,
        tok,
        limit=limit or d.val_sample_limit,
        system=cfg.template.system_prompt,
        vision=vision,
        image_root=d.image_root,
        bbox_format=d.bbox_format,
    )
    out = Path(out) if out else default_out(cfg, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    backend = open_backend(backend_name, ck, cfg, tok, codec, vision, out)
    try:
        res = run_eval(
            backend,
            val,
            codec,
            cfg.settings,
            rank=0,
            world_size=1,
            step=ck.step,
            keep=len(val),
            progress=sys.stderr.isatty(),
        )
    finally:
        backend.close()
    (out / "eval.json").write_text(json.dumps(res.metrics, indent=2, sort_keys=True) + "\n")
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for rec in res.records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    write_pngs(res.records[:pictures], out / "pictures")
    return res.metrics, out


def format_table(metrics: dict) -> str:
    width = max(len(k) for k in TABLE_KEYS)
    return "\n".join(f"{k:<{width}}  {metrics[k]:.4g}" for k in TABLE_KEYS if k in metrics) + "\n"


@click.command("eval", context_settings={"show_default": True})
@profile_options(profile_help="Profile whose val set, decoding and matching knobs are used.")
@click.option(
    "--checkpoint",
    required=True,
    metavar="DIR",
    help="Model folder, checkpoints/step-*/ (or its hf/), a run's output_dir, or a LoRA adapter folder.",
)
@click.option("--backend", "backend_name", type=click.Choice(["hf", "vllm"]), default="hf", help="Rollout engine.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Score the first N val records (default: data.val_sample_limit).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder [default: <training.output_dir>/eval/<checkpoint>].",
)
@click.option("--pictures", type=click.IntRange(min=0), default=16, help="PNGs drawn for the first N samples.")
def eval_command(
    profile: str,
    sets: tuple[str, ...],
    checkpoint: str,
    backend_name: str,
    limit: int | None,
    out: Path | None,
    pictures: int,
) -> None:
    """Evaluate a checkpoint on the profile's val set with the training eval (eval_rollout/* metrics).

    \b
    Writes OUT/eval.json, OUT/predictions.jsonl and OUT/pictures/*.png; prints a table (stdout).
    Examples:
      stage2 eval --profile smoke/ab_mixed --checkpoint assets/stage1 --limit 16
      stage2 eval -p smoke/ab_mixed --checkpoint output/stage2_ab/smoke/ab_mixed/checkpoints/step-000100
      stage2 eval -p smoke/ab_mixed --checkpoint output/stage2_ab/smoke/ab_mixed --backend vllm
    """
    from toolkit.data.records import RecordError
    from toolkit.model_source import ModelSourceError
    from toolkit.train import setup_logging

    setup_logging()
    cfg = resolve_profile(profile, sets)
    try:
        metrics, where = evaluate_checkpoint(cfg, checkpoint, backend_name, limit, out, pictures)
    except (RecordError, ModelSourceError, FileNotFoundError, ValueError) as err:
        raise EvalError(str(err)) from None
    click.echo(format_table(metrics), nl=False)
    click.echo(f"wrote {where}/eval.json, predictions.jsonl, pictures/", err=True)
