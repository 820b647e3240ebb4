"""Profile names and discovery: `prod/ab_mixed` → `<project>/configs/stage2_ab/prod/ab_mixed.yaml`.

Canonical profiles are exactly `configs/stage2_ab/{prod,smoke}/*.yaml`. A name is looked up under
the current directory's project first, then under the toolkit's own checkout. A path (absolute or
relative to the cwd, ending in .yaml) is used as given. Imports stdlib only.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.config.errors import ConfigError, Issue, Location
from toolkit.config.leaf import CANONICAL_GROUPS

TOOLKIT_ROOT = Path(__file__).resolve().parents[2]
PROFILE_DIR = Path("configs") / "stage2_ab"


def search_roots(cwd: Path | None = None) -> list[Path]:
    """Project roots searched for profile names, in order (cwd first, then the toolkit checkout)."""
    roots = [Path(cwd or Path.cwd()).resolve(), TOOLKIT_ROOT]
    return [r for i, r in enumerate(roots) if r not in roots[:i]]


def canonical_profiles(project_root: Path) -> list[Path]:
    """The canonical leaves of one project, sorted."""
    base = Path(project_root) / PROFILE_DIR
    return sorted(p for group in CANONICAL_GROUPS for p in (base / group).glob("*.yaml"))


def profile_names(cwd: Path | None = None) -> list[str]:
    """Names such as `prod/ab_mixed` of every canonical profile in the search roots."""
    names = []
    for root in search_roots(cwd):
        for path in canonical_profiles(root):
            name = f"{path.parent.name}/{path.stem}"
            if name not in names:
                names.append(name)
    return names


def resolve_profile_path(profile: str | Path, cwd: Path | None = None) -> Path:
    """An absolute profile path from a name (`smoke/ab_mixed`) or a path; ConfigError listing the
    available profiles when nothing matches."""
    cwd = Path(cwd or Path.cwd())
    text = str(profile)
    candidate = Path(text).expanduser()
    candidate = candidate if candidate.is_absolute() else cwd / candidate
    if candidate.is_file():
        return candidate.resolve()
    name = text[:-5] if text.endswith(".yaml") else text
    for root in search_roots(cwd):
        path = root / PROFILE_DIR / f"{name}.yaml"
        if path.is_file():
            return path.resolve()
    available = ", ".join(profile_names(cwd)) or "(none found)"
    raise ConfigError(
        [
            Issue.at(
                Location(text),
                "--profile",
                f"no profile named or found at {text!r}",
                f"use one of: {available}, or a path to a .yaml file",
            )
        ]
    )
