"""The `stage2 serve` rollout server: a FastAPI app over one vLLM engine per data-parallel rank.

Rooms: `app.py` (HTTP, `create_app(engine)`, importable without vLLM), `models.py` (pydantic bodies),
`engine.py` (the DP worker manager, no vLLM import), `image_paths.py` (request image paths under the
image roots), `worker.py` (one DP rank's process) and `extension.py` (vLLM's `worker_extension_cls`:
receives weight buckets) — the only modules that import vLLM, inside functions — `serve.py` (run time)
and `cli.py` (the command line). Shared with the learner, one level up: `rollout/vllm_engine.py` (engine
arguments and start), `rollout/weight_sync.py` (checkpoint specs, bucket layout), `rollout/sync_group.py`
(the gloo/NCCL group) and `rollout/errors.py` (engine errors → HTTP statuses). Never
imports `rollout/backends/` (tests/rollout/test_rooms.py). Importing this package imports nothing heavy.
"""
