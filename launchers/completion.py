"""Shell completion for `--profile` (profile names, .yaml paths) and `--set` (profile keys, as `KEY=`).

Click's own completion drives it (docs/STAGE2_RUNBOOK.md, "Shell completion"):
    eval "$(_STAGE2_COMPLETE=bash_source stage2)"                 # bash; zsh: zsh_source, fish: fish_source
    eval "$(_STAGE2_LAUNCH_COMPLETE=bash_source stage2-launch)"
Imports the config schema (voluptuous) only when a completion is asked for; never torch.
"""
from __future__ import annotations

from click.shell_completion import CompletionItem


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
