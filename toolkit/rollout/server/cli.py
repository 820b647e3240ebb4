"""Command line of the rollout server: `python -m toolkit.rollout.server …` = `stage2 serve …`.

Imports only click at import time (the launcher and `stage2 --help` import this module); the server
runtime (uvicorn, FastAPI, the DP workers) is imported when the command runs.
"""

from __future__ import annotations

import logging
import sys

import click

from toolkit.cli_options import profile_options


@click.command("serve", context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@profile_options(profile_help="Profile the learner uses (model, vllm.* knobs).")
@click.option("--gpus", default="cpu", metavar="IDS|cpu", help="GPU ids for the engines (dp × tp of them), or cpu.")
@click.option("--dp", type=click.IntRange(min=1), default=1, help="Data-parallel engines (one process each).")
@click.option("--tp", type=click.IntRange(min=1), default=1, help="Tensor-parallel size of each engine (GPU only).")
@click.option("--host", default="127.0.0.1", help="Bind address; non-loopback needs STAGE2_SERVE_TOKEN.")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="HTTP port [default: the port of the profile's first servers[].base_url].",
)
@click.option(
    "--token",
    default=None,
    envvar="STAGE2_SERVE_TOKEN",
    show_envvar=True,
    help="Bearer token: weight-changing endpoints need it; off loopback every endpoint but /health/ does.",
)
@click.option(
    "--image-root",
    "image_roots",
    multiple=True,
    metavar="DIR",
    help="Also read /infer/ images under DIR (repeatable) [default: only the profile's data folders].",
)
def serve_command(
    profile: str,
    sets: tuple[str, ...],
    gpus: str,
    dp: int,
    tp: int,
    host: str,
    port: int | None,
    token: str | None,
    image_roots: tuple[str, ...],
) -> None:
    """Serve vLLM rollouts over HTTP for server-mode learners (docs/VLLM.md).

    \b
    Examples:
      stage2 serve --profile smoke/ab_mixed --gpus cpu --dp 2
      python -m toolkit.rollout.server --profile prod/ab_mixed --gpus 4,5,6,7 --dp 4 --tp 1 --port 8000
    """
    from toolkit.config import ConfigError
    from toolkit.rollout.server.serve import ServeError, ServeOptions, run_server

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s [serve] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        code = run_server(ServeOptions(profile, tuple(sets), gpus, dp, tp, host, port, token, tuple(image_roots)))
    except (ConfigError, ServeError) as err:
        raise click.ClickException(str(err)) from None
    sys.exit(code)


def main() -> None:
    serve_command(prog_name="python -m toolkit.rollout.server")
