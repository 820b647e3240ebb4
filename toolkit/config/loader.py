"""The load pipeline: YAML → extends → --set → legacy table → strict schema → cross-field rules →
canonical leaf rules → normalization → frozen ResolvedConfig. Every error of a run is collected.

`run_pipeline` returns everything it found (lint uses it); `load_profile` raises ConfigError.
Library code: never exits, never prints. Imports no heavy module.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.config.errors import ConfigError, Issue, errors_only, warnings_only
from toolkit.config.inherit import load_chain, merge_documents
from toolkit.config.leaf import check_leaf, is_canonical_leaf
from toolkit.config.legacy import check_legacy
from toolkit.config.normalize import apply_derived, derive, fill_null_defaults, project_root_for, resolve_paths
from toolkit.config.overrides import apply_overrides
from toolkit.config.profiles import resolve_profile_path
from toolkit.config.resolved import ResolvedConfig
from toolkit.config.rules import RuleContext, all_rules, run_rules
from toolkit.config.schema import FULL_SCHEMA, KEY_INDEX, PARTIAL_SCHEMA, ROOT
from toolkit.config.validate import validate_schema
from toolkit.config.yamlio import load_document


@dataclass
class PipelineResult:
    """What one pipeline run produced: a config when there were no errors, and every issue."""

    path: Path
    config: ResolvedConfig | None = None
    issues: list[Issue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # the profile and its parents

    @property
    def errors(self) -> list[Issue]:
        return errors_only(self.issues)

    @property
    def warnings(self) -> list[Issue]:
        return warnings_only(self.issues)


def run_pipeline(
    path: Path, overrides: Sequence[str] = (), world_size: int = 1, cwd: Path | None = None
) -> PipelineResult:
    """Run every stage that can run on `path` and collect all issues."""
    path, cwd = Path(path).resolve(), Path(cwd or Path.cwd())
    result = PipelineResult(path)
    chain, issues, complete = load_chain(path)
    result.issues += issues
    result.files = [d.file for d in chain]
    leaf = chain[-1] if chain and Path(chain[-1].file) == path else None
    canonical = leaf is not None and is_canonical_leaf(path)
    if not complete:
        if canonical:
            result.issues += check_leaf(leaf, None)
        result.notes.append("schema, cross-field and leaf checks skipped until the file and its parents load")
        return result
    parent = merge_documents(chain[:-1], file=str(path))
    merged = merge_documents(chain, file=str(path))
    result.issues += apply_overrides(merged, overrides)
    result.issues += check_legacy(merged)
    raw = copy.deepcopy(merged.data)
    typed, schema_issues = validate_schema(merged, FULL_SCHEMA, ROOT, KEY_INDEX)
    result.issues += schema_issues
    if canonical:
        result.issues += check_leaf(leaf, parent.data if len(chain) > 1 else None)
    if typed is None:
        result.notes.append(f"{len(all_rules())} cross-field rules skipped until the errors above are fixed")
        return result
    result.issues += run_rules(RuleContext(typed, raw, merged, world_size))
    if result.errors:
        return result
    project_root = project_root_for(path)
    resolve_paths(typed, merged, project_root, cwd)
    fill_null_defaults(typed)
    derived = derive(typed, world_size)
    apply_derived(typed, derived)
    result.config = ResolvedConfig(typed, derived, path, project_root, tuple(overrides), tuple(result.warnings))
    return result


def load_profile(
    profile: str | Path, overrides: Sequence[str] = (), world_size: int | None = None, cwd: Path | None = None
) -> ResolvedConfig:
    """Resolve a profile name or path into a frozen ResolvedConfig.

    Args:
        profile: a name such as `prod/ab_mixed` or a path to a .yaml file.
        overrides: `KEY=VALUE` strings (the value is YAML), applied on top of the files.
        world_size: learner world size W (None → 1).
    Raises:
        ConfigError: with every issue found (sorted), never only the first.
    """
    path = resolve_profile_path(profile, cwd)
    result = run_pipeline(path, overrides, 1 if world_size is None else world_size, cwd)
    if result.config is None:
        raise ConfigError(result.errors, result.warnings, result.notes)
    return result.config


def check_parent(path: Path) -> list[Issue]:
    """Lint a parent (base) file on its own: YAML, extends form, legacy keys, unknown keys and types
    (no required keys: a base is not a complete profile)."""
    doc, issues = load_document(Path(path).resolve())
    if doc is None:
        return issues
    extends = doc.data.pop("extends", None)
    if extends is not None and not isinstance(extends, str):
        issues.append(
            Issue.at(
                doc.where(("extends",)),
                "extends",
                "extends takes exactly one relative path (a string)",
                "write `extends: ../base.yaml`",
            )
        )
    issues += check_legacy(doc)
    issues += validate_schema(doc, PARTIAL_SCHEMA, ROOT, KEY_INDEX)[1]
    return issues
