"""Startup benchmark: wall time of `stage2-lint-profiles configs/` and of `stage2-launch` up to the moment
it would spawn its first child, against `python -c "import torch"`, all measured in this run (same
machine, same load), repeated, medians reported as ratios.

    python bench/bench_startup.py [--repeat 5]

The config spine and the launcher must not import heavy engines, so linting every shipped profile, or
planning a launch, should cost a small fraction of merely importing torch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lint_command() -> list[str]:
    script = Path(sys.executable).parent / "stage2-lint-profiles"
    if script.is_file():
        return [str(script), "configs/"]
    return [sys.executable, "-c", "from launchers.cli import lint_main; lint_main()", "configs/"]


# stage2-launch's own entry point with subprocess.Popen replaced by an exit: the launch runs every step up to
# the supervisor's first spawn (flags, profile, contract, topology, run folder, checks) and stops there.
STOP_AT_SPAWN = (
    "import os, subprocess, sys\n"
    "subprocess.Popen = lambda *args, **kwargs: os._exit(0)\n"
    "from launchers.cli import launch_main\n"
    "launch_main(sys.argv[1:])"
)


def launch_command(output_dir: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        STOP_AT_SPAWN,
        "--profile",
        "smoke/ab_mixed",
        "--gpus",
        "cpu",
        "--set",
        f"training.output_dir={output_dir}",
    ]


def time_once(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    commands = {
        "stage2-lint-profiles configs/": lint_command(),
        "stage2-launch to its first spawn": launch_command(tempfile.mkdtemp(prefix="bench_startup_")),
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    time_once(commands['python -c "import torch"'])  # warm the file cache once for both
    for _ in range(args.repeat):  # interleaved, so machine load affects both alike
        for name, cmd in commands.items():
            times[name].append(time_once(cmd))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:32s} median {medians[name] * 1000:8.1f} ms  runs {[round(v * 1000) for v in values]}")
    lint, torch = medians["stage2-lint-profiles configs/"], medians['python -c "import torch"']
    launch = medians["stage2-launch to its first spawn"]
    print(
        f"ratio lint / import-torch = {lint / torch:.3f}, launch-to-spawn / import-torch = {launch / torch:.3f}  "
        f"(repeat={args.repeat})"
    )


if __name__ == "__main__":
    main()
