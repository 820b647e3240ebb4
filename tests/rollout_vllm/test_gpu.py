"""GPU paths of weight sync (marked `gpu`; collected everywhere, skipped with a reason without CUDA).

- NCCL weight-sync group between two processes on two GPUs (a learner rank and a server rank);
- a CUDA learner's buckets (packed on the GPU) over gloo to a CPU receiver, with a throughput figure;
- colocate parity on a CUDA vLLM build, when one is installed.
Only weight_sync and sync_group (torch) are needed for the first two, so they also run where FastAPI/vLLM
are absent.
"""

import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _shared import ROOT, child_env, free_port, tiny_model_dir

from toolkit.rollout.sync_group import SyncGroup
from toolkit.rollout.weight_sync import iter_buckets, pack_bucket, unpack_bucket

pytestmark = pytest.mark.gpu
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
needs_two = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL needs two GPUs: a learner and a server rank cannot share one device"
)


def _state(device, mb: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    n = (mb << 20) // 2 // 8
    return [(f"layer.{i}.weight", torch.randn(n, generator=g).to(torch.bfloat16).to(device)) for i in range(8)]


def _receiver(port: int, world: int, rank: int, backend: str, specs: list, nbytes: list, queue) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    group = SyncGroup("127.0.0.1", port, world, rank, backend, timeout_s=120)
    group.open_store(is_master=rank == 0)
    group.join()
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    sums = []
    for bucket_specs, size in zip(specs, nbytes):
        flat = torch.empty(size, dtype=torch.uint8, device=device)
        group.broadcast(flat, src=world - 1)
        sums += [float(t.float().sum()) for _, t in unpack_bucket(flat, bucket_specs)]
    queue.put(sums)
    group.close()


def _send(backend: str, learner_device: str, mb: int = 256, bucket_mb: int = 64) -> tuple[float, list, list]:
    state = _state(learner_device, mb)
    buckets = list(iter_buckets(state, bucket_mb << 20))
    packed = [pack_bucket(b) for b in buckets]
    specs = [s for _, s in packed]
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    proc = ctx.Process(target=_receiver, args=(port, 2, 0, backend, specs, [f.numel() for f, _ in packed], queue))
    proc.start()
    if backend == "nccl":
        torch.cuda.set_device(1)  # the learner's GPU; the receiver holds GPU 0
    group = SyncGroup("127.0.0.1", port, 2, 1, backend, timeout_s=120)
    group.open_store(is_master=False)
    group.join()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for flat, _ in packed:
        group.broadcast(flat if backend == "nccl" else flat.to("cpu"), src=1)
    seconds = time.perf_counter() - t0
    got = queue.get(timeout=120)
    proc.join(60)
    group.close()
    want = [float(t.float().sum()) for _, t in state]
    return seconds, got, want


@needs_cuda
def test_cuda_learner_buckets_over_gloo():
    seconds, got, want = _send("gloo", "cuda:0")
    assert got == pytest.approx(want, rel=1e-6)
    print(
        f"\nGPU learner → CPU receiver over gloo: 256 MB bf16 in 64 MB buckets: {seconds:.3f} s "
        f"({256 / seconds:.0f} MB/s)"
    )


@needs_two
def test_nccl_group_between_two_gpus():
    seconds, got, want = _send("nccl", "cuda:1")
    assert got == pytest.approx(want, rel=1e-6)
    print(f"\nNCCL GPU1 → GPU0: 256 MB bf16 in 64 MB buckets: {seconds:.3f} s ({256 / seconds:.0f} MB/s)")


@needs_cuda
def test_colocate_parity_on_cuda_vllm(tmp_path):
    from _vllm_helpers import vllm_missing

    if vllm_missing():
        pytest.skip("no CUDA vLLM build installed here (pip install -e '.[vllm]')")
    model = tiny_model_dir(tmp_path)
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_colocate_worker.py")), str(model), str(out)],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(out.read_text())
    assert report["before"]["vllm"] == report["before"]["hf"] and report["after"]["vllm"] == report["after"]["hf"]
