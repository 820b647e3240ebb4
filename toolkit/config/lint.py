"""Profile lint: discover canonical profiles under directories, run the full pipeline on each leaf,
check the bases as parents, and report strays. Produces data (text lines or JSON); never prints.

Discovery is exactly `configs/stage2_ab/{prod,smoke}/*.yaml`. `configs/base.yaml` and
`configs/stage2_ab/base.yaml` are linted as parents; any other YAML under `configs/stage2_ab/` is
reported (warning) rather than silently used. Imports stdlib only (plus the pipeline).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.config.errors import WARNING, Issue, Location, errors_only, sort_issues, warnings_only
from toolkit.config.leaf import CANONICAL_GROUPS
from toolkit.config.loader import check_parent, run_pipeline

PARENTS = (("base.yaml",), ("stage2_ab", "base.yaml"))


@dataclass
class LintReport:
    profiles: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return errors_only(self.issues)

    @property
    def warnings(self) -> list[Issue]:
        return warnings_only(self.issues)


def _configs_root(target: Path) -> Path | None:
    if target.name == "configs":
        return target
    if (target / "configs").is_dir():
        return target / "configs"
    return next((p for p in target.parents if p.name == "configs"), None)


def _classify(root: Path, path: Path) -> str:
    parts = path.relative_to(root).parts
    if parts in PARENTS:
        return "parent"
    if len(parts) == 3 and parts[0] == "stage2_ab" and parts[1] in CANONICAL_GROUPS and path.suffix == ".yaml":
        return "leaf"
    return "stray" if parts[0] == "stage2_ab" else "other"


def _stray(path: Path) -> Issue:
    return Issue.at(
        Location(str(path), 1, 1),
        "<document>",
        "not a canonical profile: only configs/stage2_ab/{prod,smoke}/*.yaml are discovered, "
        "resolved by name and linted",
        "move it into prod/ or smoke/ (extending ../base.yaml), or out of configs/stage2_ab/",
        WARNING,
    )


def discover(target: Path) -> tuple[list[Path], list[Path], list[Issue]]:
    """(leaves, parents, issues) for one directory or file argument."""
    target = Path(target).resolve()
    if target.is_file():
        root = _configs_root(target)
        kind = _classify(root, target) if root else "leaf"
        return ([target], [], []) if kind != "parent" else ([], [target], [])
    root = _configs_root(target)
    if root is None:
        return (
            [],
            [],
            [
                Issue.at(
                    Location(str(target)),
                    "<document>",
                    "no configs/ directory at or above this path",
                    "pass the project's configs/ directory (canonical profiles live in "
                    "configs/stage2_ab/{prod,smoke}/*.yaml)",
                )
            ],
        )
    scan = target if target == root or root in target.parents else root  # a project dir scans its configs/
    leaves, issues = [], []
    for path in sorted(p for p in scan.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()):
        kind = _classify(root, path)
        if kind == "leaf":
            leaves.append(path)
        elif kind == "stray":
            issues.append(_stray(path))
    parents = [root.joinpath(*parts) for parts in PARENTS if root.joinpath(*parts).is_file()]
    if not leaves:
        issues.append(
            Issue.at(
                Location(str(target)),
                "<document>",
                "no canonical profiles found",
                "add profiles under configs/stage2_ab/prod/ or configs/stage2_ab/smoke/",
            )
        )
    return leaves, parents, issues


def lint_targets(targets: Sequence[Path], cwd: Path | None = None) -> LintReport:
    """Lint every profile found under the targets (directories or files)."""
    report = LintReport()
    leaves: list[Path] = []
    parents: list[Path] = []
    for target in targets:
        found, bases, issues = discover(Path(target))
        leaves += [p for p in found if p not in leaves]
        parents += [p for p in bases if p not in parents]
        report.issues += issues
    for path in parents:
        report.issues += check_parent(path)
    for path in leaves:
        result = run_pipeline(path, (), 1, cwd)
        report.issues += result.issues
        report.notes += [f"{_rel(str(path), cwd)}: {note}" for note in result.notes]
    report.profiles = [str(p) for p in leaves]
    report.parents = [str(p) for p in parents]
    report.issues = sort_issues(report.issues)
    return report


def _rel(path: str, cwd: Path | None) -> str:
    return Location(path).render(str(cwd or Path.cwd()))


def format_text(report: LintReport, cwd: Path | None = None) -> str:
    """One `path:line:col: error|warning: key.path: message (fix: …)` line per issue."""
    base = str(cwd or Path.cwd())
    lines = []
    for issue in report.issues:
        text = f"{issue.location.render(base)}: {issue.severity}: {issue.key_path}: {issue.message}"
        lines.append(f"{text} (fix: {issue.fix})" if issue.fix else text)
    return "".join(line + "\n" for line in lines)


def format_json(report: LintReport, cwd: Path | None = None) -> str:
    """The report as one JSON document (issues, profiles, parents, notes, summary)."""
    data = {
        "profiles": [_rel(p, cwd) for p in report.profiles],
        "parents": [_rel(p, cwd) for p in report.parents],
        "issues": [
            {
                "file": _rel(i.file, cwd) if os.path.isabs(i.file) else i.file,
                "line": i.line,
                "col": i.col,
                "severity": i.severity,
                "key_path": i.key_path,
                "message": i.message,
                "fix": i.fix,
            }
            for i in report.issues
        ],
        "notes": report.notes,
        "summary": {
            "profiles": len(report.profiles),
            "parents": len(report.parents),
            "errors": len(report.errors),
            "warnings": len(report.warnings),
        },
    }
    return json.dumps(data, indent=2) + "\n"


def summary(report: LintReport) -> str:
    """A one-line human summary (for stderr), followed by any notes."""
    head = (
        f"linted {len(report.profiles)} profiles and {len(report.parents)} parents: "
        f"{len(report.errors)} errors, {len(report.warnings)} warnings"
    )
    return "\n".join(report.notes + [head])
