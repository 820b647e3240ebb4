"""Regenerate docs/readme_figures.json: the README's demo figures, measured on the pinned runs.

    .venv/bin/python scripts/readme_figures.py              # both runs (~3 min each on 2 free cores), rewrite the file
    .venv/bin/python scripts/readme_figures.py --only demo  # one of: demo, b_only
    .venv/bin/python scripts/readme_figures.py --from-runs /tmp/readme_runs   # re-read finished runs only

The pinned runs are exactly the README's commands: `stage2 train --profile smoke/ab_mixed` (the demo) and
`stage2 train --profile smoke/b_only --set training.max_steps=100 --set training.eval_steps=20 --set
data.val_sample_limit=64`. tests/e2e/test_readme_current.py checks that the README quotes these figures,
so after a change to the training math: run this script, then copy the figures it prints into README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "readme_figures.json"
RUNS = {
    "demo": ("smoke/ab_mixed", ()),
    "b_only": ("smoke/b_only", ("training.max_steps=100", "training.eval_steps=20", "data.val_sample_limit=64")),
}


def train(profile: str, sets: tuple[str, ...], out: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "toolkit.train",
        "--profile",
        profile,
        "--set",
        f"training.output_dir={out}",
        "--overwrite",
    ]
    for item in sets:
        argv += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run(argv, cwd=ROOT, env=env, check=True)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def demo_figures(metrics: list[dict]) -> dict:
    """Eval F1 per eval step, class-aware F1 first/last, valid-JSON range and drop, first B step's F1."""
    evals = [r for r in metrics if "eval_rollout/f1" in r]
    valid = [r["eval_rollout/valid_json_rate"] for r in evals]
    first_b = next(r for r in metrics if r["channel"] == "B")
    return {
        "first_b_rollout_f1": round(first_b["rollout/f1"], 2),
        "eval_steps": [r["step"] for r in evals],
        "eval_f1": [round(r["eval_rollout/f1"], 3) for r in evals],
        "class50_f1": [round(evals[0]["eval_rollout/class50/f1"], 2), round(evals[-1]["eval_rollout/class50/f1"], 2)],
        "valid_json": [round(min(valid), 2), round(max(valid), 2)],
        "valid_json_drop": round(valid[0] - valid[-1], 3),
    }


def b_only_figures(metrics: list[dict]) -> dict:
    """The B-hot collapse signature: eval valid JSON falls (first → last eval), training rollouts' predicted
    objects per GT rise (Σ rollout/pred_objects / Σ rollout/gt_objects over the first vs the last 20 steps),
    eval precision falls."""
    evals = [r for r in metrics if "eval_rollout/f1" in r]
    first, last = evals[0], evals[-1]

    def per_gt(window: list[dict]) -> float:
        return round(sum(r["rollout/pred_objects"] for r in window) / sum(r["rollout/gt_objects"] for r in window), 2)

    return {
        "valid_json": [round(first["eval_rollout/valid_json_rate"], 2), round(last["eval_rollout/valid_json_rate"], 2)],
        "pred_per_gt": [per_gt(metrics[:20]), per_gt(metrics[-20:])],
        "precision": [round(first["eval_rollout/precision"], 2), round(last["eval_rollout/precision"], 2)],
    }


EXTRACT = {"demo": demo_figures, "b_only": b_only_figures}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="demo,b_only", help="comma list out of demo,b_only")
    p.add_argument("--from-runs", type=Path, help="read finished runs under this folder instead of training")
    p.add_argument(
        "--runs",
        type=Path,
        default=Path(tempfile.gettempdir()) / "readme_runs",
        help="where the runs are written (each into <runs>/<name>)",
    )
    args = p.parse_args(argv)
    figures = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        out = (args.from_runs or args.runs) / name
        if args.from_runs is None:
            train(*RUNS[name], out)
        figures[name] = EXTRACT[name](rows(out))
    FIGURES.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
