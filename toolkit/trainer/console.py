"""The terminal during training: one progress bar at the bottom, log lines above it, no third-party bars.

On a terminal, rank 0 shows the step bar (and `run_eval`'s eval bar under it while evaluating); log
records are written through tqdm (`tqdm.contrib.logging.logging_redirect_tqdm`), so each line is
printed above the bar instead of being glued to its tail. When stderr is not a terminal (a log file,
SLURM, a pipe) there is no bar at all: plain log lines only. Progress bars of transformers and the hub
client ("Loading weights", "Writing model shards") are switched off on every rank for the run.
docs/STAGE2_RUNBOOK.md ("What you see") shows the screen.
"""

from __future__ import annotations

import sys


def interactive(rank: int) -> bool:
    """Bars only on rank 0 and only when stderr is a terminal."""
    return rank == 0 and sys.stderr.isatty()


def quiet_third_party_bars() -> None:
    """No transformers / huggingface_hub progress bars (weight loading, shard writing) during the run."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


class StepBar:
    """The training bar. While it is open, logging goes through tqdm.write (above the bar)."""

    def __init__(self, total: int, initial: int, rank: int):
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        quiet_third_party_bars()
        self.on = interactive(rank)
        self.bar = tqdm(
            total=total, initial=initial, desc="stage2", unit="step", disable=not self.on, dynamic_ncols=True
        )
        self._redirect = logging_redirect_tqdm() if self.on else None
        if self._redirect is not None:
            self._redirect.__enter__()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, *args, **kwargs) -> None:
        self.bar.set_postfix(*args, **kwargs)

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        self.bar.close()
