"""A child's log file as the supervisor uses it: opened with a header line, copied live to the console,
and its last lines quoted in an error. Must never import torch, transformers, deepspeed, vllm or fastapi.
"""

from __future__ import annotations

import codecs
import threading
import time
from pathlib import Path
from typing import TextIO


def open_log(path: Path, header: str) -> tuple[TextIO, int]:
    """Open (append) a child's log, write one header line; returns the file and the offset after it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(path, "a", buffering=1)  # the child writes to it; Supervisor.terminate closes it
    log_file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {header}\n")
    return log_file, log_file.tell()


def follow(path: Path, offset: int, done: threading.Event, console: TextIO) -> None:
    """Copy what the child appends to its log onto the console until `done` and nothing is left."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(path, "rb") as fh:
        fh.seek(offset)
        while True:
            chunk = fh.read(65536)
            if chunk:
                try:
                    console.write(decoder.decode(chunk))
                    console.flush()
                except (OSError, ValueError):
                    pass
            elif done.is_set():
                return
            else:
                time.sleep(0.1)


def tail(path: Path, lines: int = 15) -> str:
    """The log's last lines, indented under a heading for an error message ("" when unreadable or empty)."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n  last lines of the log:\n    " + "\n    ".join(text) if text else ""
