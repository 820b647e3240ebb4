"""Per-rank entry point: what torchrun, the deepspeed launcher and `stage2 train` start.

    python -m toolkit.train --profile smoke/ab_mixed                          # one CPU process
    torchrun --nproc_per_node 2 -m toolkit.train --profile smoke/ab_mixed     # two CPU ranks (gloo)
    python -m toolkit.train --profile smoke/ab_mixed --resume auto            # newest complete checkpoint

A run owns its training.output_dir (toolkit/runlayout.py): a fresh run refuses a folder holding another
run's checkpoints or metrics unless --overwrite (which moves that run aside); --resume auto continues
only a run with the same resolved config. Rank 0 checks, before any rank loads a model.

Exit codes: 0 done; 1 bad profile / bad data / a taken folder (a message, never a traceback); 128+N after
a stop signal N (SIGTERM → 143, SIGUSR1 → 138) once the step finished and the checkpoint was written;
SIGTERM or SIGINT during start-up (before the first step) stop at once, writing nothing (143, 130).
Importing this module is cheap: the trainer (torch, DeepSpeed) is imported when a run starts.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

try:
    import click

    from toolkit.cli_options import profile_options
except ModuleNotFoundError as _err:  # `python3 -m toolkit.train` outside the project's venv
    sys.exit(
        f"{_err}: run with the project's venv: `.venv/bin/python -m toolkit.train …` or "
        "`source .venv/bin/activate` first (`bash scripts/setup.sh` creates it)"
    )

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


VENV_HINT = (
    "run with the project's venv: `.venv/bin/stage2 train …` / `.venv/bin/python -m toolkit.train …`, "
    "or `source .venv/bin/activate` first (`bash scripts/setup.sh` creates it)"
)


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(profile: str, overrides: tuple[str, ...] = (), resume: str | None = None, overwrite: bool = False) -> int:
    """Load the profile for this rank's world size, claim the run folder (rank 0), then setup → train →
    cleanup. Returns the exit code (128 + N at once for SIGTERM/SIGINT during start-up; see StartupSignals)."""
    startup = StartupSignals()
    startup.install()
    try:
        return _start_and_train(profile, overrides, resume, overwrite, startup)
    except StartupStopped as stop:
        log.warning("signal %d during start-up: stopped before the first step (nothing to checkpoint)", stop.signum)
        return 128 + stop.signum


def _start_and_train(
    profile: str, overrides: tuple[str, ...], resume: str | None, overwrite: bool, startup: StartupSignals
) -> int:
    try:
        from toolkit.config import load_profile
    except ModuleNotFoundError as err:
        raise click.ClickException(f"{err}: {VENV_HINT}") from None

    from toolkit.preflight import check_prerequisites

    cfg = load_profile(profile, overrides, world_size=int(os.environ.get(*WORLD_ENV)))
    log.info("profile %s (project root %s)", cfg.profile_path, cfg.project_root)
    check_prerequisites(cfg)
    from toolkit.vlm.support import check_model_support

    check_model_support(cfg.model.model, cfg.settings.rollout_backend)  # before any engine starts
    if os.environ.get("RANK", "0") == "0":
        from toolkit.rollout.backends.build import announce_servers
        from toolkit.runlayout import as_written, claim_run_folder

        if cfg.derived.server_mode:  # said now: loading the model takes a while before the server wait
            announce_servers(cfg.settings.server)

        tr = cfg.training
        for note in claim_run_folder(tr.output_dir, as_written(cfg), resume, overwrite, tr.logging_dir):
            log.warning("%s", note)
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
        from toolkit.trainer.distributed import describe_peer_failure

        lost = describe_peer_failure(exc, cfg.training.collective_timeout_s)
        if lost:
            log.error("%s", lost)
        raise
    finally:
        trainer.cleanup(clean)


@click.command("train", context_settings={"show_default": True})
@profile_options
@click.option(
    "--resume",
    default=None,
    metavar="auto|PATH",
    help="Continue from the newest complete checkpoint under training.output_dir (auto; the run's "
    "config must match) or from the checkpoint PATH.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start a new run in a folder that holds another run: move that run to <output_dir>.old-<time>/ first.",
)
def train_command(profile: str, sets: tuple[str, ...], resume: str | None, overwrite: bool) -> None:
    """Train one rank of a Stage-2 AB run (all ranks when started by torchrun).

    \b
    Examples:
      stage2 train --profile smoke/ab_mixed
      stage2 train -p smoke/ab_mixed --resume auto
      stage2 train --profile smoke/b_only --set training.max_steps=4 --set training.output_dir=/tmp/run
      torchrun --nproc_per_node 2 -m toolkit.train --profile smoke/ab_mixed
    """
    try:
        from toolkit.config import ConfigError
        from toolkit.data.records import RecordError
    except ModuleNotFoundError as err:
        raise click.ClickException(f"{err}: {VENV_HINT}") from None
    from toolkit.preflight import PreflightError
    from toolkit.rollout.client import RolloutServerError  # requests only, no vLLM
    from toolkit.runlayout import RunFolderError
    from toolkit.trainer.checkpoint import CheckpointError
    from toolkit.vlm.support import ModelSupportError

    setup_logging()
    try:
        code = run(profile, sets, resume, overwrite)
    except (
        ConfigError,
        RecordError,
        CheckpointError,
        FileNotFoundError,
        ModelSupportError,
        RunFolderError,
        PreflightError,
        RolloutServerError,
    ) as err:
        # Errors a user fixes from the message alone (it names the file/key/server and the fix): no traceback.
        raise click.ClickException(str(err)) from None
    sys.exit(code)


if __name__ == "__main__":
    train_command()
