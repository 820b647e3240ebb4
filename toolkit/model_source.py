"""`model.model` (or `stage2 eval --checkpoint`) as a model source: a local folder or a Hugging Face hub id.

Without this, a mistyped relative path reaches the hub client, which retries for minutes and then says
"Repo id must be in the form 'repo_name' or 'namespace/repo_name'"; a hub id on a machine without network
fails with a long chain of connection errors. Here both become one sentence naming the key and the fix.
Imports nothing heavy.
"""

from __future__ import annotations

import os
from pathlib import Path


class ModelSourceError(FileNotFoundError):
    """model.model names neither an existing folder nor a reachable / cached hub model (a FileNotFoundError,
    so `stage2 train` reports it as one message)."""


def looks_like_path(name: str) -> bool:
    """A path, not a hub id: absolute, ./ ../ ~, a backslash, or more than one '/' (hub ids are 'org/name')."""
    return name.startswith(("/", "./", "../", "~", ".")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def check_model_source(name: str, key: str = "model.model") -> None:
    """Raise ModelSourceError when `name` is a path that does not exist (hub ids are checked on load)."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelSourceError(f"{key}: {name} is a file; it must be a model folder (with config.json)")
        return
    if looks_like_path(name):
        raise ModelSourceError(
            f"{key}: {name} does not exist (resolved to {p.resolve()}); "
            "fix the path, or run from the folder it is relative to"
        )


def hub_unreachable(name: str, key: str = "model.model") -> ModelSourceError:
    return ModelSourceError(
        f"{key}: {name!r} is not a local folder (no {Path(name).expanduser().resolve()}), and the Hugging Face hub "
        "could not be reached to download it "
        f"(no network?): download it where there is network (`hf download {name} --local-dir DIR`) and set "
        f"{key} to DIR"
    )


def from_pretrained(load, name: str, key: str = "model.model", **kwargs):
    """`load(name, **kwargs)` (a from_pretrained), with a missing path or an unreachable hub said plainly."""
    check_model_source(name, key)
    if not Path(name).expanduser().exists():
        check_hub(name, key)
    return load(name, **kwargs)


def check_hub(name: str, key: str = "model.model") -> None:
    """A hub id must be in the local cache, or on a reachable hub; else one sentence saying which failed."""
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # downloaded before: from_pretrained loads it from the cache, network or not
    except HFValidationError:
        raise ModelSourceError(f"{key}: {name!r} is neither an existing folder nor a hub id ('org/name')") from None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise hub_unreachable(name, key)
    try:
        model_info(name, timeout=20)
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"{key}: {name!r} is not a local folder (no {Path(name).resolve()}) and not a model "
            "on the Hugging Face hub; fix the path or the id"
        ) from None
    except Exception:  # noqa: BLE001 - any transport failure (DNS, proxy, timeout) reads the same to the user
        raise hub_unreachable(name, key) from None
