"""Per-rank entry point: what torchrun, the deepspeed launcher and `stage2 train` start.

    python -m toolkit.train --profile smoke/ab_mixed                          # one CPU process
    torchrun --nproc_per_node 2 -m toolkit.train --profile smoke/ab_mixed     # two CPU ranks (gloo)
    python -m toolkit.train --profile smoke/ab_mixed --resume auto            # newest complete checkpoint

Exit codes: 0 done; 1 bad profile / bad data (a message, never a traceback); 128+N after a stop
signal N (SIGTERM → 143, SIGUSR1 → 138) once the step finished and the checkpoint was written; SIGTERM or
SIGINT during start-up (before the first step) stop at once, writing nothing (143, 130).
Importing this module is cheap: the trainer (torch, DeepSpeed) is imported when a run starts.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import click

WORLD_ENV = ("WORLD_SIZE", "1")
STOP_NOW = (signal.SIGTERM, signal.SIGINT)  # during start-up: stop at once
log = logging.getLogger("toolkit.train")


class StartupStopped(BaseException):
    """SIGTERM/SIGINT arrived during start-up. A BaseException (like KeyboardInterrupt) so that no library's
    `except Exception` retry loop (hub downloads, server waits) swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_now(signum, _frame):
    raise StartupStopped(signum)


class StartupSignals:
    """Signal handling until the trainer's own handlers take over (the end of its setup).

    SIGTERM / SIGINT stop the process at once: there is nothing to checkpoint yet, and start-up can wait
    for minutes (model download retries, data, servers). SIGUSR1 (SLURM's "checkpoint, then requeue"
    warning) is kept and handed to the trainer, which checkpoints after the first step as always.
    """

    def __init__(self) -> None:
        self.deferred = 0

    def install(self) -> None:
        for sig in STOP_NOW:
            signal.signal(sig, _stop_now)
        signal.signal(signal.SIGUSR1, self._defer)

    def _defer(self, signum, _frame) -> None:
        self.deferred = signum
        log.warning("signal %d during start-up: will checkpoint and stop after the first step", signum)


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(profile: str, overrides: tuple[str, ...] = (), resume: str | None = None) -> int:
    """Load the profile for this rank's world size, then setup → train → cleanup. Returns the exit code
    (128 + N at once for SIGTERM/SIGINT during start-up; see StartupSignals)."""
    startup = StartupSignals()
    startup.install()
    try:
        return _start_and_train(profile, overrides, resume, startup)
    except StartupStopped as stop:
        log.warning("signal %d during start-up: stopped before the first step (nothing to checkpoint)", stop.signum)
        return 128 + stop.signum


def _start_and_train(profile: str, overrides: tuple[str, ...], resume: str | None, startup: StartupSignals) -> int:
    from toolkit.config import load_profile

    cfg = load_profile(profile, overrides, world_size=int(os.environ.get(*WORLD_ENV)))
    from toolkit.vlm.support import check_model_support

    check_model_support(cfg.model.model, cfg.rollout_matching_cfg["rollout_backend"])  # before any engine starts
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from toolkit.trainer.loop import Stage2Trainer

    trainer = Stage2Trainer(cfg, resume=resume)
    clean = False
    try:
        trainer.setup()  # installs the trainer's handlers last
        trainer.stop_signum = trainer.stop_signum or startup.deferred
        code = trainer.train()
        clean = True
        return code
    except Exception as exc:
        from toolkit.trainer.engine import describe_peer_failure

        lost = describe_peer_failure(exc, cfg.training.collective_timeout_s)
        if lost:
            log.error("%s", lost)
        raise
    finally:
        trainer.cleanup(clean)


@click.command("train", context_settings={"show_default": True})
@click.option("--profile", required=True, help="Profile name (smoke/ab_mixed, prod/b_only, ...) or path to a .yaml file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a profile key (repeatable; VALUE is YAML).")
@click.option("--resume", default=None, metavar="auto|PATH",
              help="Continue from the newest complete checkpoint under training.output_dir (auto) or from PATH.")
def train_command(profile: str, overrides: tuple[str, ...], resume: str | None) -> None:
    """Train one rank of a Stage-2 AB run (all ranks when started by torchrun).

    \b
    Examples:
      stage2 train --profile smoke/ab_mixed
      stage2 train --profile smoke/b_only --set training.max_steps=4 --set training.output_dir=/tmp/run
      torchrun --nproc_per_node 2 -m toolkit.train --profile smoke/ab_mixed
    """
    from toolkit.config import ConfigError
    from toolkit.data.records import RecordError
    from toolkit.trainer.checkpoint import CheckpointError
    from toolkit.vlm.support import ModelSupportError

    setup_logging()
    try:
        code = run(profile, overrides, resume)
    except (ConfigError, RecordError, CheckpointError, FileNotFoundError, ModelSupportError) as err:
        raise click.ClickException(str(err)) from None
    sys.exit(code)


if __name__ == "__main__":
    train_command()
