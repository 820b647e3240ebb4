"""Weights & Biases as a metric sink (`training.report_to: [..., wandb]`), rank 0 only.

The run is `training.wandb_project` / `training.run_name`; the resolved config is uploaded as the run's
config; every record `MetricsWriter` writes (metrics.jsonl / TensorBoard) is logged with the same keys
and step, plus the eval pictures (toolkit/trainer/draw.py). The run id is kept in
`<output_dir>/wandb_run_id`, so `--resume` continues the same W&B run. No network: WANDB_MODE=offline
(then `wandb sync <output_dir>/wandb/offline-run-*` later). `wandb` is imported only when the sink is on.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

log = logging.getLogger(__name__)
ID_FILE = "wandb_run_id"
MISSING = (
    "training.report_to includes wandb, but the wandb package is not installed: "
    "pip install -e '.[wandb]' (or remove wandb from training.report_to)"
)


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise ImportError(MISSING) from None
    return wandb


class WandbLog:
    """Rank 0's W&B run. `write` logs one step's metrics (with any pictures queued for that step)."""

    def __init__(self, cfg, output_dir: str | Path, *, resumed: bool):
        import yaml

        wandb = import_wandb()
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        id_file = out / ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        tr = cfg.training
        self.run = wandb.init(
            project=tr.wandb_project,
            name=tr.run_name,
            id=run_id,
            resume="allow",
            dir=str(out),
            config=yaml.safe_load(cfg.to_yaml()),
        )
        self._pictures: dict = {}
        log.info("W&B run %s/%s (id %s)%s", tr.wandb_project, tr.run_name, run_id, " resumed" if resumed else "")

    def add_pictures(self, paths_by_name: dict) -> None:
        """Queue `{"eval_pictures/<sample_id>": png_path}`; logged with the next `write`."""
        wandb = import_wandb()
        self._pictures.update({k: wandb.Image(str(p)) for k, p in paths_by_name.items()})

    def write(self, step: int, channel: str, values: dict) -> None:
        self.run.log({**values, **self._pictures}, step=int(step))
        self._pictures = {}

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class Sinks:
    """`MetricsWriter` plus W&B, written together: the loop keeps calling `writer.write` / `writer.close`."""

    def __init__(self, writer, wandb_log: WandbLog):
        self.writer, self.wandb = writer, wandb_log

    def write(self, step: int, channel: str, values: dict) -> None:
        self.writer.write(step, channel, values)
        self.wandb.write(step, channel, values)

    def close(self) -> None:
        self.writer.close()
        self.wandb.close()

    def __getattr__(self, name):  # anything else MetricsWriter offers
        return getattr(self.writer, name)


def with_wandb(writer, cfg, rank: int, output_dir: str | Path, *, resumed: bool):
    """`writer` unchanged unless wandb is in training.report_to and this is rank 0; then both, as one.
    A missing wandb package stopped every rank at start-up already (toolkit/preflight.py check_prerequisites)."""
    if "wandb" not in cfg.training.report_to or rank != 0:
        return writer
    return Sinks(writer, WandbLog(cfg, output_dir, resumed=resumed))
