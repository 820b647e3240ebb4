"""Host side of a Channel-B step (issue 13 item 3), this tree vs an older commit, interleaved in ONE process.

    python bench/bench_host_ab.py OLD_COMMIT [--repeats 21]

The older commit's toolkit/ is extracted to a temporary folder as the package `toolkit_old` (imports
rewritten), so both versions run in this process on the same 56 LVIS-shaped samples (bench_step's
`lvis_samples`), alternately: each side's `rollout_to_segment` of every sample, then its learner's packing,
in thread CPU time. Prints both medians, the median of the per-pair ratios, and whether the two versions
built identical segments (ids, CE weights, coord slots and bins, box groups, metrics).
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_step  # noqa: E402  (the bench folder is not a package: found through sys.path above)


def extract_old(commit: str, root: Path) -> None:
    """git archive COMMIT toolkit → root/toolkit_old, with `toolkit.` imports rewritten; configs linked."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "toolkit"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    (root / "toolkit").rename(root / "toolkit_old")
    for path in (root / "toolkit_old").rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\btoolkit(?=[.\s])", "toolkit_old", text))
    for name in ("configs", "ds_configs", "assets"):  # the config loader finds these next to its package
        (root / name).symlink_to(REPO / name)


def side(pkg: str):
    import torch

    def mod(name):
        return importlib.import_module(f"{pkg}.{name}")

    cfg = mod("config").load_profile(
        str(REPO / "configs/stage2_ab/prod/ab_mixed.yaml"), [f"model.model={bench_step.MODEL}"], world_size=1
    )
    codec = mod("rollout.codec").HFTokenCodec(mod("data.tokenizer").load_tokenizer(str(bench_step.MODEL)))
    learner = mod("trainer.step").StepLearner.from_config(cfg, torch.tensor(codec.coord_token_ids), "cpu")
    cb = mod("trainer.channel_b").ChannelBSettings.from_config(cfg)
    return codec, cb, learner, mod("trainer.channel_b").rollout_to_segment, mod("rollout.targets").Drop


def once(samples, codec, cb, learner, to_segment, drop) -> tuple[float, list]:
    t0 = time.thread_time()
    segs = [to_segment(s, ro, codec, cb) for s, ro in samples]
    learner.packer().add([s for s in segs if not isinstance(s, drop)], last=True)
    return time.thread_time() - t0, segs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old_commit")
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    from toolkit.data.render import render_messages
    from toolkit.data.tokenizer import encode_prompt, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        extract_old(args.old_commit, Path(tmp))
        sys.path.insert(0, tmp)
        new, old = side("toolkit"), side("toolkit_old")
        prompt = encode_prompt(load_tokenizer(str(bench_step.MODEL)), render_messages("detect"))
        samples = bench_step.lvis_samples(new[0], prompt, 56)
        view = [
            [
                (g.input_ids, g.ce_weights, g.coord_pos, g.coord_bins, g.box_groups, g.meta)
                if hasattr(g, "input_ids")
                else (g.reason, g.meta)
                for g in once(samples, *s)[1]
            ]
            for s in (old, new)
        ]
        times = {"old": [], "new": []}
        for _ in range(args.repeats):
            times["old"].append(once(samples, *old)[0])
            times["new"].append(once(samples, *new)[0])
    n = len(samples)
    for name, ts in times.items():
        print(f"{name}: {1000 * statistics.median(ts) / n:.3f} ms per sample (median of {len(ts)})")
    ratios = [b / a for a, b in zip(times["old"], times["new"])]
    print(
        f"new / old per pair: median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}); "
        f"identical segments: {view[0] == view[1]}"
    )


if __name__ == "__main__":
    main()
