"""ResolvedConfig: the frozen, fully-defaulted view every consumer reads.

Attribute access to sections and keys (`cfg.training.learning_rate`,
`cfg.rollout_matching.vllm.server.servers[0].base_url`); lists come back as tuples; assigning raises.
`to_dict()` hands out a deep copy. Imports stdlib only (plus our YAML writer).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

from toolkit.config.normalize import Derived
from toolkit.config.settings import Settings, build_settings
from toolkit.config.yamlio import dump_yaml


def _wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return ConfigSection(value)
    if isinstance(value, list):
        return tuple(_wrap(v) for v in value)
    return value


class ConfigSection:
    """A read-only attribute view of one mapping of the resolved config."""

    __slots__ = ("_data",)

    def __init__(self, data: dict):
        object.__setattr__(self, "_data", data)

    def __getattr__(self, name: str) -> Any:
        data = object.__getattribute__(self, "_data")
        if name not in data:
            raise AttributeError(f"no config key {name!r}; keys here: {', '.join(data)}")
        return _wrap(data[name])

    def __getitem__(self, name: str) -> Any:
        return _wrap(self._data[name])

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"the resolved config is frozen; cannot set {name!r} (use --set on the command line)")

    __delattr__ = __setattr__

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConfigSection) and self._data == other._data

    __hash__ = None  # type: ignore[assignment]

    def keys(self):
        return self._data.keys()

    def to_dict(self) -> dict:
        return copy.deepcopy(self._data)

    def __repr__(self) -> str:
        return f"ConfigSection({self._data!r})"


class ResolvedConfig:
    """The resolved profile: sections, derived values, typed settings, and where it came from."""

    __slots__ = ("_data", "derived", "settings", "profile_path", "project_root", "overrides", "warnings")
    settings: Settings  # the typed runtime knobs (settings.py), built once here

    def __init__(
        self,
        data: dict,
        derived: Derived,
        profile_path: Path,
        project_root: Path,
        overrides: tuple = (),
        warnings: tuple = (),
    ):
        values = {
            "_data": copy.deepcopy(data),
            "derived": derived,
            "profile_path": Path(profile_path),
            "project_root": Path(project_root),
            "overrides": tuple(overrides),
            "warnings": list(warnings),
        }
        values["settings"] = build_settings(values["_data"], derived.vllm_sync_mode)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        data = object.__getattribute__(self, "_data")
        if name not in data:
            raise AttributeError(f"no config section {name!r}; sections: {', '.join(data)}")
        return _wrap(data[name])

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"the resolved config is frozen; cannot set {name!r} (use --set on the command line)")

    __delattr__ = __setattr__

    def to_dict(self) -> dict:
        """The resolved sections as a plain nested dict (a deep copy); loadable as a profile again."""
        return copy.deepcopy(self._data)

    def to_yaml(self, header: dict | None = None) -> str:
        """The resolved sections as YAML, preceded by comment lines: profile, overrides, derived values."""
        lines = [f"# resolved from: {self.profile_path}", f"# project root: {self.project_root}"]
        lines += [f"# --set {o}" for o in self.overrides]
        lines.append("# derived: " + ", ".join(f"{k}={v}" for k, v in self.derived.to_dict().items()))
        lines += [f"# {k}: {v}" for k, v in (header or {}).items()]
        return "\n".join(lines) + "\n" + dump_yaml(self._data)

    def __repr__(self) -> str:
        return f"ResolvedConfig(profile={str(self.profile_path)!r}, world_size={self.derived.learner_world_size})"
