"""The `stage2 serve` rollout server: a FastAPI app over one vLLM engine per data-parallel rank.

Rooms: `app.py` (HTTP, `create_app(engine)`, importable without vLLM), `models.py` (pydantic bodies),
`errors.py` (engine errors → HTTP statuses), `engine.py` (the DP worker manager, no vLLM import),
`worker.py` (one DP rank's process) and `extension.py` (vLLM's `worker_extension_cls`: receives weight
buckets) — the only modules that import vLLM, inside functions — `weight_sync.py` (checkpoint specs,
bucket layout and the gloo/NCCL group, shared with the learner), `serve.py` (run time) and `cli.py`
(the command line). Importing this package imports nothing heavy.
"""
