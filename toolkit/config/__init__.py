"""The config spine: load, validate and resolve Stage-2 profiles into one frozen ResolvedConfig.

Pipeline (toolkit.config.loader): YAML with positions → one-hop `extends` → `--set` overrides →
legacy-key table → strict voluptuous schema → cross-field rules → canonical leaf rules →
normalization → ResolvedConfig. Every error carries file:line:col, the dotted key path and a fix.

Must never import torch, transformers, deepspeed, vllm or fastapi (a test checks sys.modules):
`stage2 config`, `preflight` and `lint-profiles` start in a fraction of a second.
"""

from toolkit.config.dsconfig import ds_config_names, ds_config_path, load_ds_config
from toolkit.config.errors import ConfigError, Issue, Location
from toolkit.config.loader import load_profile, run_pipeline
from toolkit.config.normalize import Derived, derive, project_root_for
from toolkit.config.profiles import profile_names, resolve_profile_path
from toolkit.config.resolved import ResolvedConfig

__all__ = [
    "ConfigError",
    "Derived",
    "Issue",
    "Location",
    "ResolvedConfig",
    "derive",
    "ds_config_names",
    "ds_config_path",
    "load_ds_config",
    "load_profile",
    "profile_names",
    "project_root_for",
    "resolve_profile_path",
    "run_pipeline",
]
