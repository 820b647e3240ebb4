"""Image paths of an /infer/ request, checked before any worker reads them (docs/VLLM.md "Request limits").

Every path must be absolute and, after realpath (no `..`, no symlink escape), a readable file under one of
the server's image roots: the served profile's data folders plus `stage2 serve --image-root DIR`.
"""

from __future__ import annotations

import os

from toolkit.rollout import errors


def check_image_paths(images: list[list[str]], n_prompts: int, roots: tuple[str, ...]) -> list[list[str]]:
    """The real paths of `images`; 400 before any decoding unless there is one entry per prompt and every
    path is absolute and, after realpath (no `..`, no symlink escape), a readable file under one of `roots`.

    Missing and forbidden paths get the same message, so the answer never tells what exists outside the
    roots. Paths are read on the server host: the learner and the server must share the filesystem."""
    if len(images) != n_prompts:
        raise errors.BadRequest(
            f"{n_prompts} prompts but {len(images)} image entries (send one list of paths per prompt)"
        )
    out = []
    for i, paths in enumerate(images):
        out.append([])
        for path in paths:
            if not os.path.isabs(path):
                raise errors.BadRequest(
                    f"images[{i}]: image path {path!r} is not absolute (the server reads images from "
                    "its own filesystem, shared with the learner)"
                )
            real = allowed_file(path, roots)
            if real is None:
                raise errors.BadRequest(
                    f"images[{i}]: image {path!r} is not a readable file under the server's image "
                    "roots (learner and server must share the filesystem; the roots are the served "
                    "profile's data folders plus `stage2 serve --image-root DIR`, listed in the "
                    "server log at start-up)"
                )
            out[-1].append(real)
    return out


def allowed_file(path: str, roots: tuple[str, ...]) -> str | None:
    """realpath(path) if it is a readable regular file inside one of `roots` (themselves real paths), else None.

    >>> allowed_file("/etc/../etc/hostname", ("/tmp",)) is None
    True
    """
    try:
        real = os.path.realpath(path)
        inside = any(os.path.commonpath((real, root)) == root for root in roots)
        return real if inside and os.path.isfile(real) and os.access(real, os.R_OK) else None
    except (OSError, ValueError):  # a NUL byte, a name too long
        return None


def image_roots(folders) -> tuple[str, ...]:
    """Real paths of the existing directories among `folders` (duplicates and nested ones kept: harmless)."""
    out = []
    for folder in folders:
        if folder:
            real = os.path.realpath(folder)
            if os.path.isdir(real) and real not in out:
                out.append(real)
    return tuple(out)
