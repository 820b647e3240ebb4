"""Read-only views of the process tree from /proc, for the supervisor (Linux).

Why groups are not enough: the supervisor starts each child in its own process group, but torchrun
starts every rank in a NEW session (torch.distributed.elastic's subprocess handler uses
start_new_session), so killing torchrun's group misses the ranks, and a SIGKILLed torchrun leaves
them orphaned. The supervisor therefore records every process group it sees under each child (ranks
included) and, as a child subreaper, adopts orphans so they stay findable. This module only reads
/proc and sets the subreaper flag; launchers/supervisor.py sends the signals.
Must never import torch, transformers, deepspeed, vllm or fastapi.
"""

from __future__ import annotations

import ctypes
import os
from typing import NamedTuple

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


class ProcInfo(NamedTuple):
    ppid: int
    pgrp: int
    state: str  # "Z" = zombie (exited, not yet reaped)


def scan() -> dict[int, ProcInfo]:
    """Every process visible in /proc: pid → (ppid, pgrp, state)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read().decode(errors="replace")
        except OSError:  # exited while we looked
            continue
        fields = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2:
            table[int(entry)] = ProcInfo(int(fields[1]), int(fields[2]), fields[0])
    return table


def descendants(table: dict[int, ProcInfo], root: int) -> set[int]:
    """Pids below `root` in the parent tree (not including root)."""
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        for pid in children.get(stack.pop(), ()):
            if pid not in found:
                found.add(pid)
                stack.append(pid)
    return found


def live_in_groups(groups: set[int], table: dict[int, ProcInfo] | None = None) -> list[int]:
    """Live (non-zombie) pids whose process group is one of `groups`."""
    table = scan() if table is None else table
    return sorted(pid for pid, info in table.items() if info.pgrp in groups and info.state != "Z")


def _prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def set_subreaper(on: bool) -> bool:
    """Make this process adopt orphaned descendants (instead of init). Returns whether it worked."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


def pdeathsig_setter(signum: int):
    """A preexec step: the child gets `signum` when the launcher dies (looked up before fork)."""
    prctl = _prctl()

    def apply() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)

    return apply
