"""Issues and ConfigError: where a problem is, which key, what is wrong, how to fix it.

Owns the one error type of the config spine. Imports nothing heavy (stdlib only).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

ERROR = "error"
WARNING = "warning"
OVERRIDE_SOURCE = "--set"


@dataclass(frozen=True)
class Location:
    """A place in a source: a file (absolute path) or `--set`, with 1-based line/column when known."""

    file: str
    line: int | None = None
    col: int | None = None

    def render(self, relative_to: str | None = None) -> str:
        """`file:line:col` (the file relative to `relative_to` when it lies below it)."""
        name = self.file
        if relative_to and os.path.isabs(name):
            try:
                rel = os.path.relpath(name, relative_to)
                if not rel.startswith(".."):
                    name = rel
            except ValueError:  # other drive (Windows)
                pass
        if self.line is None:
            return name
        return f"{name}:{self.line}:{self.col or 1}"


@dataclass(frozen=True)
class Issue:
    """One finding. `key_path` is dotted with list indices, e.g.
    `rollout_matching.vllm.server.servers[0].group_port`."""

    file: str
    line: int | None
    col: int | None
    key_path: str
    message: str
    fix: str = ""
    severity: str = ERROR

    @classmethod
    def at(cls, loc: Location | None, key_path: str, message: str, fix: str = "", severity: str = ERROR) -> Issue:
        """An issue at a Location (None → unknown file)."""
        loc = loc or Location("<unknown>")
        return cls(loc.file, loc.line, loc.col, key_path, message, fix, severity)

    @property
    def location(self) -> Location:
        return Location(self.file, self.line, self.col)

    def sort_key(self) -> tuple:
        return (self.file, self.line or 0, self.col or 0, self.key_path, self.message)

    def render(self, relative_to: str | None = None) -> str:
        """`file:line:col: key.path: message (fix: …)`."""
        text = f"{self.location.render(relative_to)}: {self.key_path}: {self.message}"
        return f"{text} (fix: {self.fix})" if self.fix else text

    def __str__(self) -> str:
        return self.render()


def sort_issues(issues: Iterable[Issue]) -> list[Issue]:
    """Issues sorted by place, with exact duplicates removed (a parent's issue seen through two leaves)."""
    return sorted(set(issues), key=Issue.sort_key)


@dataclass
class ConfigError(Exception):
    """Every error found in one run of the pipeline (never only the first).

    `issues` holds the errors; `warnings` the warnings seen on the way; `notes` trailing lines such as
    "3 cross-field rules skipped until the errors above are fixed".
    """

    issues: list[Issue]
    warnings: list[Issue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.issues = sort_issues(self.issues)
        self.warnings = sort_issues(self.warnings)
        super().__init__(self.issues)

    def render(self, relative_to: str | None = None) -> str:
        lines = [i.render(relative_to) for i in self.issues]
        return "\n".join(lines + list(self.notes))

    def __str__(self) -> str:
        return self.render(os.getcwd())


def errors_only(issues: Sequence[Issue]) -> list[Issue]:
    return [i for i in issues if i.severity == ERROR]


def warnings_only(issues: Sequence[Issue]) -> list[Issue]:
    return [i for i in issues if i.severity == WARNING]
