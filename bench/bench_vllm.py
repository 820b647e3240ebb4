"""vLLM rollout benchmark: ratios measured in ONE run (same machine, same load), medians of --repeat.

    python bench/bench_vllm.py [--model DIR] [--prompts 32] [--new-tokens 64] [--repeat 3] [--server URL]

1. our colocate backend vs raw `LLM.generate` on the same prompts (same engine, same chunks of 8;
   plus raw with every prompt in one call, vLLM's best case) — the cost of our wrapper;
2. decode_batch_size 8 vs 1, for the HF backend and for the vLLM backend — what the one knob buys;
3. a weight sync (colocate: `load_weights` from the learner's tensors + prefix-cache reset) vs
   `torch.save` of the same state dict to a file — a sync should cost about a checkpoint write or less.
With --server URL (a running `stage2 serve` of the same model): the server backend's tok/s and its
gloo weight sync (bucketed broadcast + version handshake) as well.

The default model is the committed tiny Qwen2 (random init, fp32); numbers on it measure overheads,
not a real model's decode speed. Set OMP_NUM_THREADS=1 on small CPU machines (cpu_engines.md).
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
EOS, PAD = 2, 0


def tiny_model_dir(tmp: Path) -> Path:
    out = tmp / "tiny_model"
    out.mkdir()
    for part in ("tiny_qwen2", "tokenizer"):
        for f in (REPO / "assets" / part).iterdir():
            shutil.copy(f, out / f.name)
    return out


def settings(dbs: int, new_tokens: int):
    from toolkit.rollout.backends.base import DecodeSettings

    return DecodeSettings(max_new_tokens=new_tokens, decode_batch_size=dbs, do_sample=False, temperature=1.0, top_p=1.0,
                          top_k=-1, repetition_penalty=1.0, repeat=None, seed=0)


def median_time(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def tok_s(rollouts, seconds: float) -> float:
    return sum(len(r.completion_ids) for r in rollouts) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model dir (default: the committed tiny model)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--server", default=None, help="URL of a running `stage2 serve` of the same model")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from toolkit.rollout.backends.hf import HFBackend
    from toolkit.rollout.backends.vllm_colocate import VLLMColocateBackend, sampling_dict, to_sampling_params

    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    model_dir = args.model or str(tiny_model_dir(tmp))
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 1000) for _ in range(rng.randint(16, 48))] for _ in range(args.prompts)]
    learner = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    weights = lambda device: ((n, p.detach().to(device)) for n, p in learner.named_parameters())  # noqa: E731
    vcfg = {"max_model_len": 1024, "tensor_parallel_size": 1, "gpu_memory_utilization": 0.3, "enable_prefix_caching": True,
            "enforce_eager": True, "dtype": "auto", "kv_cache_gb": 0.5}
    n, r = args.new_tokens, args.repeat
    colo = VLLMColocateBackend.create(model=model_dir, vcfg=vcfg, settings=settings(8, n), model_dtype="float32",
                                      eos_id=EOS, weights=weights)
    colo.generate(prompts[:2], step=0)  # warm-up and first weight load

    rows = []
    # 1. wrapper overhead: ours vs raw LLM.generate, same engine, same chunks
    from vllm.inputs import TokensPrompt

    params = to_sampling_params(sampling_dict(settings(8, n), EOS, None))

    def raw(chunk: int):
        outs = []
        for i in range(0, len(prompts), chunk):
            outs += colo.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[i:i + chunk]], params, use_tqdm=False)
        return outs

    t_ours, ro = median_time(lambda: colo.generate(prompts, step=0), r)
    t_raw, raw_out = median_time(lambda: raw(8), r)
    t_raw_all, _ = median_time(lambda: raw(len(prompts)), r)
    toks = sum(len(o.outputs[0].token_ids) for o in raw_out)
    rows.append(("vLLM colocate backend tok/s (dbs 8)", tok_s(ro, t_ours)))
    rows.append(("raw LLM.generate tok/s (chunks of 8)", toks / t_raw))
    rows.append(("raw LLM.generate tok/s (one call)", toks / t_raw_all))
    ratio_wrapper = tok_s(ro, t_ours) / (toks / t_raw)

    # 2. decode_batch_size 8 vs 1
    colo.s = settings(1, n)
    t_v1, v1 = median_time(lambda: colo.generate(prompts, step=0), r)
    colo.s = settings(8, n)
    hf8, hf1 = HFBackend(learner, settings(8, n), pad_id=PAD, eos_id=EOS), HFBackend(learner, settings(1, n), pad_id=PAD, eos_id=EOS)
    t_h8, h8 = median_time(lambda: hf8.generate(prompts, step=0), r)
    t_h1, h1 = median_time(lambda: hf1.generate(prompts, step=0), r)
    rows += [("vLLM tok/s (dbs 1)", tok_s(v1, t_v1)), ("HF tok/s (dbs 8)", tok_s(h8, t_h8)), ("HF tok/s (dbs 1)", tok_s(h1, t_h1))]

    # 3. weight sync vs torch.save of the same state dict
    def sync():
        colo.loaded_step = None
        colo.sync_weights(0)

    t_sync, _ = median_time(sync, r)
    state = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    t_save, _ = median_time(lambda: torch.save(state, tmp / "sd.pt"), r)
    mb = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    rows += [("colocate weight sync s", t_sync), (f"torch.save s ({mb:.1f} MB)", t_save)]
    ratios = [("ours / raw LLM.generate (same chunks)", ratio_wrapper),
              ("vLLM dbs 8 / dbs 1", tok_s(ro, t_ours) / tok_s(v1, t_v1)),
              ("HF dbs 8 / dbs 1", tok_s(h8, t_h8) / tok_s(h1, t_h1)),
              ("vLLM / HF tok/s (dbs 8)", tok_s(ro, t_ours) / tok_s(h8, t_h8)),
              ("colocate sync / torch.save", t_sync / t_save)]
    colo.close()

    if args.server:
        from toolkit.rollout.backends.vllm_server import ServerClient, VLLMServerBackend

        client = ServerClient(args.server, 51599, timeout_s=60, infer_timeout_s=600)
        client.wait_healthy(60)
        srv = VLLMServerBackend([client], settings(8, n), eos_id=EOS, weights=weights, bucket_size_mb=64)
        srv.connect_weight_sync()
        srv.generate(prompts[:2], step=0)
        t_srv, so = median_time(lambda: srv.generate(prompts, step=0), r)

        def push():
            srv.synced_step = None
            srv.sync_weights(0)

        t_push, _ = median_time(push, r)
        srv.close()
        rows += [("server backend tok/s (dbs 8 × server world)", tok_s(so, t_srv)), ("server gloo weight sync s", t_push)]
        ratios += [("server / colocate tok/s", tok_s(so, t_srv) / tok_s(ro, t_ours)), ("server sync / torch.save", t_push / t_save)]

    print(f"# bench_vllm: {args.prompts} prompts × ≤{n} new tokens, median of {r}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    for name, value in rows:
        print(f"{name:48s} {value:10.3f}")
    print("# ratios")
    for name, value in ratios:
        print(f"{name:48s} {value:10.3f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
