"""Room rule of toolkit/rollout (docs/ARCHITECTURE.md): no import arrow between `backends/` and `server/`.

Read from the source with `ast`, function-level imports included, and followed through the shared rollout
modules (`vllm_engine`, `weight_sync`, `sync_group`, `client`, ...): a backend that reaches the server
through one of them breaks the rule as much as a direct import does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLLOUT = ROOT / "toolkit" / "rollout"
BACKENDS, SERVER = "toolkit.rollout.backends", "toolkit.rollout.server"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROLLOUT.rglob("*.py")}


def imported(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (`from pkg import mod` counts as pkg.mod when mod is one)."""
    out = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return out


def reachable(start: str) -> dict[str, str]:
    """Rollout modules reachable from `start` through rollout modules, each with the module that imports it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        mod = todo.pop()
        for dep in imported(MODULES[mod]):
            if dep in MODULES and dep not in seen and dep != start:
                seen[dep] = mod
                todo.append(dep)
    return seen


def in_room(mod: str, room: str) -> bool:
    return mod == room or mod.startswith(room + ".")


@pytest.mark.parametrize("room, other", [(BACKENDS, SERVER), (SERVER, BACKENDS)])
def test_no_import_arrow_between_backends_and_server(room, other):
    assert any(in_room(m, room) for m in MODULES) and any(in_room(m, other) for m in MODULES)
    arrows = []
    for mod in sorted(m for m in MODULES if in_room(m, room)):
        for dep, via in sorted(reachable(mod).items()):
            if in_room(dep, other):
                arrows.append(f"{mod} → {dep}" + ("" if via == mod else f" (imported by {via})"))
    assert arrows == []


def test_imports_are_read_from_function_bodies_too():
    # The worker imports the engine module inside a method: the reader must see it, or the rule above is blind.
    assert "toolkit.rollout.vllm_engine" in imported(MODULES["toolkit.rollout.server.worker"])


def test_toolkit_never_imports_the_launchers():
    # The house is one-way: launchers/ (the outer CLI and supervision) import toolkit, never the reverse.
    arrows = []
    for path in sorted((ROOT / "toolkit").rglob("*.py")):
        arrows += [
            f"{path.relative_to(ROOT)} → {m}" for m in imported(path) if m == "launchers" or m.startswith("launchers.")
        ]
    assert arrows == []
