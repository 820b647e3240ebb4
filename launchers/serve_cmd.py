"""`stage2 serve`: the rollout server command, registered lazily in launchers/cli.py.

A thin shim: the command lives with the server (toolkit/rollout/server/cli.py, which imports only
click at import time), so `stage2 serve` and `python -m toolkit.rollout.server` are one command.
"""
from toolkit.rollout.server.cli import serve_command as serve

__all__ = ["serve"]
