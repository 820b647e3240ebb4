"""Generated hostile requests for every rollout-server endpoint (a seeded mutation fuzzer, no server code).

Each request starts from a valid body of its endpoint (so many reach the engine) and has one to three
spots replaced by a hostile value: out-of-range integers, non-finite floats, paths, wrong types, a
dropped key or an unknown one. A few are not JSON objects at all. Deterministic for a given seed.
"""

from __future__ import annotations

import json
import random

NAN, INF = float("nan"), float("inf")
INTS = [-1, 0, 1, 3, 1023, 1024, 1025, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**40]
FLOATS = [NAN, INF, -INF, 1e308, -1e308, 0.0, -0.0, 5e-324, 2.0000001, 0.5, 1e-9]
PATHS = [
    "",
    "/etc/passwd",
    "/etc/hostname",
    "../../../etc/shadow",
    "a\x00b",
    "/tmp/" + "x" * 5000,
    "/proc/self/environ",
    "~/.ssh/id_rsa",
    "relative.png",
    "/",
    "/dev/zero",
    "file:///etc/passwd",
    "\u202e/gnp.exe",
]
WRONG = [None, True, False, "1", "", [], {}, [[1]], {"a": 1}, 1.5, [None], "NaN"]
GET_PATHS = ["/health/", "/get_world_size/", "/info/", "/weights_schema/"]
POST_PATHS = ["/infer/", "/init_communicator/", "/update_weights/", "/reset_prefix_cache/", "/close_communicator/"]


class Fuzzer:
    def __init__(self, seed: int, vocab: int, tensors: list[dict], image_files: list[str], free_port):
        self.rng = random.Random(seed)
        self.vocab, self.tensors, self.image_files, self.free_port = vocab, tensors, image_files, free_port
        self.n = 0

    # ------------------------------------------------------------------ valid bodies
    def infer(self) -> dict:
        r = self.rng
        prompts = [[r.randrange(self.vocab) for _ in range(r.randint(1, 8))] for _ in range(r.randint(1, 3))]

        def sampling() -> dict:
            s = {
                "max_tokens": r.randint(1, 4),
                "temperature": r.choice([0.0, 0.7, 2.0]),
                "top_p": r.choice([1.0, 0.9]),
                "top_k": r.choice([-1, 5]),
                "repetition_penalty": r.choice([1.0, 1.3]),
                "stop_token_ids": [2],
            }
            if r.random() < 0.5:
                s["seed"] = r.randrange(2**31)
            return s

        body = {
            "request_id": f"fz{self.n}-{r.randrange(10**9)}",
            "prompts": prompts,
            "sampling": [sampling()] if r.random() < 0.5 else [sampling() for _ in prompts],
        }
        if r.random() < 0.2:
            body["expect_weight_version"] = r.choice([None, 0, 1])
        if r.random() < 0.25:
            body["images"] = [[r.choice(PATHS + self.image_files)] for _ in prompts]
        return body

    def init_communicator(self) -> dict:
        r = self.rng
        body = {
            "port": self.free_port() if r.random() < 0.7 else r.randint(1024, 65535),
            "world_size": r.choice([2, 2, 3]),
            "timeout_s": r.choice([0.5, 1.0]),
        }
        if r.random() < 0.5:
            body["backend"] = r.choice([None, "gloo", "nccl"])
        return body

    def update_weights(self) -> dict:
        r = self.rng
        picked = r.sample(self.tensors, k=min(len(self.tensors), r.randint(1, 2)))
        return {"version": r.randint(0, 5), "tensors": [dict(t) for t in picked], "last": r.random() < 0.5}

    # ------------------------------------------------------------------ mutation
    def hostile_value(self):
        r = self.rng
        pool = r.choice([INTS, FLOATS, PATHS, WRONG])
        value = r.choice(pool)
        return [value] if r.random() < 0.15 else value

    def mutate(self, body: dict) -> dict:
        r = self.rng
        body = json.loads(json.dumps(body))  # a deep copy
        for _ in range(r.randint(1, 3)):
            spots = list(_spots(body))
            container, key = r.choice(spots)
            roll = r.random()
            if roll < 0.1 and isinstance(container, dict):
                container.pop(key, None)
            elif roll < 0.15 and isinstance(container, dict):
                container[r.choice(["bogus", "ignore_eos", "n", "logprobs", "__proto__"])] = self.hostile_value()
            else:
                container[key] = self.hostile_value()
        return body

    # ------------------------------------------------------------------ requests
    def request(self) -> tuple[str, str, bytes | None]:
        """(method, path, raw body or None)."""
        r = self.rng
        self.n += 1
        roll = r.random()
        if roll < 0.08:
            return "GET", r.choice(GET_PATHS + ["/nope/", "/infer/", "/../etc/passwd", "/docs", "/openapi.json"]), None
        if roll < 0.13:
            return (
                "POST",
                r.choice(POST_PATHS),
                r.choice(
                    [
                        b"",
                        b"{",
                        b"[1,2]",
                        b"null",
                        b"\xff\xfe",
                        b"1e999",
                        b'{"a":' * 2000 + b"1" + b"}" * 2000,
                        b'"x"',
                        b"NaN",
                    ]
                ),
            )
        path = r.choice(
            ["/infer/"] * 5
            + ["/init_communicator/", "/update_weights/", "/reset_prefix_cache/", "/close_communicator/"]
        )
        if path in ("/reset_prefix_cache/", "/close_communicator/"):
            return "POST", path, None if r.random() < 0.5 else json.dumps(self.hostile_value()).encode()
        base = {
            "/infer/": self.infer,
            "/init_communicator/": self.init_communicator,
            "/update_weights/": self.update_weights,
        }[path]()
        body = base if r.random() < 0.15 else self.mutate(base)
        return "POST", path, json.dumps(body).encode()  # NaN/Infinity written as bare tokens


def _spots(node, parent=None, key=None):
    """(container, key) of every value inside `node` (the containers themselves included)."""
    if parent is not None:
        yield parent, key
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _spots(v, node, k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _spots(v, node, i)
