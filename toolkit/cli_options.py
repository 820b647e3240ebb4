"""The Click pieces every `stage2` command shares: `--profile/--set` (declared once, KEY=VALUE checked,
shell completion), resolving a profile, and `ConfigFailure` (a ConfigError/PreflightError/PlacementError as
`Error:` plus one line per issue, exit 1).

Shell completion for `--profile` (profile names, .yaml paths) and `--set` (profile keys, as `KEY=`) is Click's
own (docs/STAGE2_RUNBOOK.md, "Shell completion"): `eval "$(_STAGE2_COMPLETE=bash_source stage2)"`.

Imports only click at import time (the config room inside functions, when a completion is asked for):
`stage2 --help` and every command module import it, so it must stay light.
"""

from __future__ import annotations

import click
from click.shell_completion import CompletionItem

PROFILE_HELP = "Profile name (prod/ab_mixed, smoke/a_only, ...) or path to a .yaml file."
SET_HELP = (
    "Override KEY=VALUE (repeatable); VALUE is YAML, e.g. --set 'x.servers=[{base_url: ..., group_port: 51300}]'."
)


class ConfigFailure(click.ClickException):
    """A ConfigError, PreflightError or PlacementError shown as `Error:` plus one line per issue; exit code 1."""

    def __init__(self, error: Exception):
        text = str(error)
        count = len(getattr(error, "issues", ())) or 1
        super().__init__(f"{count} error(s)\n{text}" if "\n" in text or count > 1 else text)


def check_sets(ctx, param, values):
    """Each `--set` must be KEY=VALUE (a usage error, exit 2, before anything is resolved)."""
    for value in values:
        if "=" not in value:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE (e.g. training.learning_rate=1e-5)")
    return tuple(values)


def complete_profile(ctx, param, incomplete: str) -> list:
    """Canonical profile names (cwd's project first, then the installed checkout) and matching .yaml paths."""
    from toolkit.config.profiles import profile_names

    items = [CompletionItem(name) for name in profile_names() if name.startswith(incomplete)]
    if not items:
        items = [CompletionItem(incomplete, type="file")]  # not a name: let the shell complete a .yaml path
    return items


def set_keys() -> list[str]:
    """Every leaf key of the profile schema as a dotted path (list items are set as a whole)."""
    from toolkit.config.schema import ROOT
    from toolkit.config.spec import Section, walk_spec

    return [".".join(path) for path, node in walk_spec(ROOT) if not isinstance(node, Section) and "[]" not in path]


def complete_set(ctx, param, incomplete: str) -> list:
    """`training.max_st` → `training.max_steps=`; nothing once a `=` is typed (the value is YAML)."""
    if "=" in incomplete:
        return []
    return [CompletionItem(f"{key}=") for key in set_keys() if key.startswith(incomplete)]


def profile_options(func=None, *, required: bool = True, profile_help: str = PROFILE_HELP, set_help: str = SET_HELP):
    """`--profile/-p` and `--set` (parameters `profile`, `sets`) for every command that resolves a profile.

    Use bare (`@profile_options`) or with keywords (`@profile_options(required=False, profile_help=...)`).
    """

    def decorate(f):
        f = click.option(
            "--set",
            "sets",
            multiple=True,
            metavar="KEY=VALUE",
            callback=check_sets,
            help=set_help,
            shell_complete=complete_set,
        )(f)
        return click.option(
            "--profile",
            "-p",
            required=required,
            metavar="NAME|PATH",
            help=profile_help,
            shell_complete=complete_profile,
        )(f)

    return decorate(func) if func is not None else decorate


def resolve_profile(profile, sets, world_size: int = 1):
    """load_profile with a ConfigError shown as a ConfigFailure (exit 1)."""
    from toolkit.config import ConfigError, load_profile

    try:
        return load_profile(profile, sets, world_size=world_size)
    except ConfigError as exc:
        raise ConfigFailure(exc) from None
