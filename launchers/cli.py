"""`stage2` command line (Click): lint-profiles, config, preflight; room for train, launch, serve.

Rules of this module: command bodies parse, call one library function and exit (≤ 10 lines);
stdout carries only data (YAML/JSON/lint lines), people-facing text goes to stderr; exit 0 = ok,
1 = findings or ClickException, 2 = usage. Never imports torch/transformers/deepspeed/vllm/fastapi:
the library is imported inside command bodies, and subcommands that live in other modules are
registered by "module:attr" in LAZY_SUBCOMMANDS and imported only when invoked or listed.
"""

from __future__ import annotations

import difflib
import importlib
import json
from pathlib import Path

import click

from toolkit.cli_options import ConfigFailure, profile_options, resolve_profile

# Subcommands living in their own modules: name → "module:attr". `stage2 --help` imports each module
# to read its short help, so those modules must import heavy engines inside their callbacks only.
LAZY_SUBCOMMANDS: dict[str, str] = {
    "train": "toolkit.train:train_command",
    "launch": "launchers.launch_cmd:launch",
    "serve": "toolkit.rollout.server.cli:serve_command",
    "data": "toolkit.data.cli:data",
    "eval": "toolkit.eval_cmd:eval_command",
}


class LazyGroup(click.Group):
    """A Group that imports subcommands from LAZY_SUBCOMMANDS only when they are needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_SUBCOMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_SUBCOMMANDS and name not in self.commands:
            module, attr = LAZY_SUBCOMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """An unknown subcommand gets "did you mean" (`stage2 trian` → train)."""
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=2, cutoff=0.6)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            ctx.fail(f"No such command {name!r}.{hint} Commands: {', '.join(self.list_commands(ctx))}.")
        return super().resolve_command(ctx, args)


def _echo_warnings(warnings) -> None:
    for issue in warnings:
        click.echo(f"warning: {issue}", err=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """stage2: validate, resolve and launch Stage-2 AB training profiles.

    \b
    Examples:
      stage2 lint-profiles configs/                      # lint every profile (CI exit code)
      stage2 config --profile prod/ab_mixed              # the fully resolved config as YAML
      stage2 preflight --profile prod/ab_mixed --gpus 0,1 --server-gpus 2,3   # launcher contract JSON
    """


@main.command("lint-profiles")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: one `path:line:col: error|warning: ...` line per issue; json: one document.",
)
def lint_profiles(paths: tuple[Path, ...], fmt: str) -> None:
    """Lint every canonical profile (configs/stage2_ab/{prod,smoke}/*.yaml) under PATHS.

    Bases (configs/base.yaml, configs/stage2_ab/base.yaml) are checked as parents; other YAML under
    configs/stage2_ab/ is reported as a warning. Exit 1 when any error is found.

    \b
    Examples:
      stage2-lint-profiles configs/
      stage2 lint-profiles configs/ --format json | jq '.summary'
      stage2 lint-profiles configs/stage2_ab/prod/ab_mixed.yaml
    """
    from toolkit.config.lint import format_json, format_text, lint_targets, summary

    report = lint_targets(paths)
    click.echo((format_json if fmt == "json" else format_text)(report), nl=False)
    click.echo(summary(report), err=True)
    if report.errors:
        click.get_current_context().exit(1)


@main.command("config")
@profile_options
@click.option(
    "--world-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Learner world size W used for derived values (gradient accumulation = E / (P × W)).",
)
@click.option(
    "--settings",
    "settings_only",
    is_flag=True,
    help="Print only the typed runtime settings (cfg.settings: decode, match, packing, vllm, server, ...).",
)
@click.option("--derived", "derived_only", is_flag=True, help="Print only the derived values.")
def config_command(
    profile: str, sets: tuple[str, ...], world_size: int, settings_only: bool, derived_only: bool
) -> None:
    """Print the fully resolved config of a profile as YAML (defaults filled, paths absolute).

    \b
    Examples:
      stage2 config --profile prod/ab_mixed
      stage2 config --profile smoke/ab_mixed --world-size 2 --derived
      stage2 config --profile smoke/b_only --set rollout_matching.decode_batch_size=8 --settings
      stage2 config -p prod/ab_mixed \
        --set 'rollout_matching.vllm.server.servers=[{base_url: "http://127.0.0.1:9000", group_port: 51300}]'
    """
    from toolkit.config.yamlio import dump_yaml

    cfg = resolve_profile(profile, sets, world_size)
    views = {"settings": lambda: dump_yaml(cfg.settings.to_dict()), "derived": lambda: dump_yaml(cfg.derived.to_dict())}
    view = "settings" if settings_only else "derived" if derived_only else None
    click.echo(views[view]() if view else cfg.to_yaml(), nl=False)
    _echo_warnings(cfg.warnings)


@main.command("preflight")
@profile_options
@click.option(
    "--gpus", metavar="IDS|cpu", help="Learner GPUs, e.g. 0,1 (W = number of ids), or cpu (W = --nproc). Default: cpu."
)
@click.option("--nproc", type=click.IntRange(min=1), help="Learner ranks with --gpus cpu (default 1).")
@click.option("--server-gpus", metavar="IDS", help="GPUs for rollout servers (server mode).")
def preflight_command(
    profile: str, sets: tuple[str, ...], gpus: str | None, nproc: int | None, server_gpus: str | None
) -> None:
    """Print the launcher contract as ONE line of JSON (schema-checked; no GPU or network touched).

    \b
    Examples:
      stage2 preflight --profile prod/ab_mixed --gpus 0,1 --server-gpus 2,3
      stage2 preflight --profile smoke/ab_mixed --gpus cpu --nproc 2
      stage2 preflight -p smoke/ab_mixed --set rollout_matching.rollout_backend=vllm | jq .vllm_mode
    """
    from toolkit.config import ConfigError
    from toolkit.config.placement import GpuListError, Placement, PlacementError
    from toolkit.preflight import PreflightError, preflight_for_profile

    try:
        contract = preflight_for_profile(profile, sets, Placement.from_flags(gpus, nproc, server_gpus))
    except GpuListError as exc:
        raise click.BadParameter(str(exc)) from None  # a malformed list is a usage error (exit 2)
    except (ConfigError, PreflightError, PlacementError) as exc:
        raise ConfigFailure(exc) from None
    click.echo(json.dumps(contract, separators=(",", ":")))


def lint_main(argv: list[str] | None = None) -> None:
    """Console script `stage2-lint-profiles` (= `stage2 lint-profiles`)."""
    lint_profiles.main(args=argv, prog_name="stage2-lint-profiles")


def launch_main(argv: list[str] | None = None) -> None:
    """Console script `stage2-launch` (= `stage2 launch`)."""
    from launchers.launch_cmd import launch

    launch.main(args=argv, prog_name="stage2-launch")
