"""A STAND-IN for the rollout server (`python -m toolkit.rollout.server`), for supervisor fault tests only.

It takes the real server's command line (--profile --gpus --dp --tp --host --port [--set ...]) and
speaks the read-only part of the protocol (GET /health/, /get_world_size/, /info/), so the launcher
can start, probe and stop it exactly like the real server. It exists ONLY for faults the real server
cannot be made to show: never becoming healthy, a world size other than the one the launcher started
it with, ignoring SIGTERM. (A server exiting at start-up and one dying mid-run are provoked on the
real server: a corrupt checkpoint, SIGKILL to its process group; see test_supervisor.py.)
STANDIN_MODE selects the fault:
    ok                healthy at once; world size = dp × tp (the fake-srun server step of
                      test_sbatch_scripts.py, which checks command lines, not serving)
    never_healthy     /health/ answers 503 forever
    world_size:N      healthy, but /get_world_size/ says N
    ignore_term       healthy, and ignores SIGTERM (the supervisor must SIGKILL it)
Stdlib only; starts in well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--profile", "--gpus", "--host"):
        parser.add_argument(flag, required=True)
    for flag in ("--dp", "--tp", "--port"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    mode, _, value = os.environ.get("STANDIN_MODE", "ok").partition(":")
    size = int(value) if mode == "world_size" else args.dp * args.tp
    model = os.environ.get("STANDIN_MODEL", "")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            routes = {
                "/health/": (503, {"status": "starting"}) if mode == "never_healthy" else (200, {"status": "ok"}),
                "/get_world_size/": (200, {"world_size": size}),
                "/info/": (200, {"model": model, "max_model_len": 1024, "weight_version": 0}),
            }
            status, body = routes.get(self.path, (404, {"detail": "not found"}))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *a):
            sys.stderr.write("standin: " + fmt % a + "\n")

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"standin server ({mode}) on {args.host}:{args.port} argv={sys.argv[1:]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
