"""Helpers shared by several test folders (importable because tests/conftest.py puts tests/ on sys.path; worker
scripts started as subprocesses put it there themselves): the committed tiny models, ports, the env of a product
subprocess, a run's metrics.jsonl, the CLI in a fresh interpreter, the decode and engine settings of test backends
(also imported by bench/bench_vllm.py), and the plain-PyTorch reference step."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Engines the CLI path must never import (toolkit/config and launchers/ rooms: docs/ARCHITECTURE.md).
HEAVY = ("torch", "transformers", "deepspeed", "vllm", "fastapi")
# Variables of the test process's own job, rank and rendezvous: a test run under SLURM or torchrun must not
# hand them to the product it starts.
JOB_VARS = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")  # children talk to 127.0.0.1 only


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    """The env of a product subprocess: the test process's env (DS_ACCELERATOR=cpu unless set: tests/conftest.py)
    less its job/rank variables and proxies, one OpenMP thread, no tokenizer threads, unbuffered output (log
    lines arrive as written), this checkout first on PYTHONPATH; then `extra` (wins over all of it)."""
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARS + PROXY_VARS}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def metrics(out: Path) -> list[dict]:
    """The rows of the run folder `out`'s metrics.jsonl, [] when the run wrote none."""
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


_STAGE2_RUNS = """
import contextlib, importlib, io, json, sys
from launchers.cli import main
codes = []
for args in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main.main(args=args, prog_name="stage2", standalone_mode=False)
            codes.append(0)
        except SystemExit as exc:
            codes.append(exc.code)
for module in sys.argv[2:]:
    importlib.import_module(module)
print(json.dumps({"codes": codes, "modules": sorted(sys.modules)}))
"""


def stage2_in_fresh_python(runs: list[list[str]], *imports: str) -> tuple[list, list[str]]:
    """Run `stage2 ARGS` for each ARGS of `runs` (output swallowed), then import `imports`, in one fresh
    interpreter at the repository root: the exit codes (0 or None: success) and every module it loaded."""
    proc = subprocess.run(
        [sys.executable, "-c", _STAGE2_RUNS, json.dumps(runs), *imports],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["codes"], out["modules"]


def heavy(modules) -> list[str]:
    """The modules of `modules` that belong to a HEAVY package."""
    return [m for m in modules if m.split(".")[0] in HEAVY]


def tiny_model_dir(tmp: Path) -> Path:
    """The committed random-init tiny Qwen2 + tokenizer as one from_pretrained / vLLM directory
    (untied, head_dim 32) — tests that must not depend on the Stage-1 checkpoint use it."""
    out = Path(tmp) / "tiny_model"
    if not out.exists():
        out.mkdir(parents=True)
        for part in ("tiny_qwen2", "tokenizer"):
            for f in (ROOT / "assets" / part).iterdir():
                shutil.copy(f, out / f.name)
    return out


def greedy_settings(max_new_tokens: int, decode_batch_size: int, seed: int, **kw):
    """Decode settings of the test and bench backends: greedy, neutral sampling knobs, no repeat guard;
    `kw` overrides any field (do_sample, temperature, repeat, ...)."""
    from toolkit.config.settings import DecodeSettings

    base = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, repeat=None)
    return DecodeSettings(
        max_new_tokens=max_new_tokens, decode_batch_size=decode_batch_size, seed=seed, **{**base, **kw}
    )


def vllm_settings(**kw):
    """Engine settings of the test and bench engines: the schema's defaults, but eager, a small KV cache, a short
    length; `kw` overrides any field."""
    from toolkit.config.settings import VllmSettings

    base = dict(
        mode="colocate",
        max_model_len=512,
        tensor_parallel_size=1,
        gpu_memory_utilization=0.45,
        enable_lora=False,
        enable_prefix_caching=True,
        enforce_eager=True,
        max_num_seqs=None,
        max_num_batched_tokens=None,
        dtype="auto",
        kv_cache_gb=0.25,
        max_images_per_prompt=1,
    )
    return VllmSettings(**{**base, **kw})


def tiny_vlm_dir() -> Path:
    """The committed random-init tiny Qwen2-VL folder (model + literal tokenizer + image-only processor),
    made by `assets/build_assets.py`; tests load it read-only."""
    out = ROOT / "assets" / "vlm" / "tiny_qwen2_vl"
    if not (out / "config.json").is_file():
        raise FileNotFoundError(f"{out} is missing: rebuild it with `python assets/build_assets.py --only vlm_model`")
    return out


def shape_images(tmp: Path, sizes=((112, 112), (84, 112), (112, 56))) -> list[str]:
    """Deterministic noise PNGs of the given (width, height) sizes; their paths."""
    import numpy as np
    from PIL import Image

    paths = []
    for i, (w, h) in enumerate(sizes):
        path = Path(tmp) / f"img{i}.png"
        Image.fromarray((np.random.RandomState(i).rand(h, w, 3) * 255).astype("uint8")).save(path)
        paths.append(str(path))
    return paths


class PlainStep:
    """The plain-PyTorch reference optimizer step of the equivalence workers (tests/README.md §5): the trainer's
    AdamW and LambdaLR built by `toolkit.trainer.optim`, gradients summed from zero, clipped, one step."""

    def __init__(self, model, opt_kwargs: dict, total: int, warmup: int, max_grad_norm: float):
        from toolkit.trainer import optim

        self.model, self.max_grad_norm = model, max_grad_norm
        self.opt = optim.build_optimizer(model, **opt_kwargs)
        self.sched = optim.build_lr_scheduler(self.opt, total, warmup, "cosine")

    def update(self, backward) -> dict:
        """One step: `backward()` accumulates every gradient and returns the per-rank losses it reports."""
        import torch

        lr = self.opt.param_groups[0]["lr"]
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        rank_losses = backward()
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm))
        self.opt.step()
        self.sched.step()
        return {"rank_losses": rank_losses, "grad_norm": norm, "lr": lr}
