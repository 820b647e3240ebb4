"""vLLM worker extension (`worker_extension_cls`) that receives broadcast weight buckets.

vLLM mixes this class into its Worker, in every TP worker process (or in-process with the external
launcher), and `llm.collective_rpc("stage2_…")` calls its methods. Only plain data crosses the RPC
(names, dtypes, shapes); tensors travel over the weight-sync group. torch and vLLM are imported
inside the methods.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class WeightSyncExtension:
    """Weight-sync receiver methods mixed into vLLM's Worker (state errors name the fix)."""

    def stage2_open_store(
        self,
        host: str,
        port: int,
        world_size: int,
        rank_base: int,
        backend: str,
        timeout_s: float,
        bind_host: str | None = None,
    ) -> int:
        from vllm.distributed import get_tensor_model_parallel_rank

        from toolkit.rollout.sync_group import SyncGroup

        rank = rank_base + get_tensor_model_parallel_rank()
        self._stage2_group = SyncGroup(host, port, world_size, rank, backend, timeout_s)
        self._stage2_group.open_store(is_master=rank == 0, bind_host=bind_host)
        return rank

    def stage2_join_group(self) -> None:
        self._stage2_require().join()

    def stage2_peer_ready(self) -> bool:
        """Has the learner announced itself in the store? (non-blocking)"""
        return self._stage2_require().peer_ready()

    def stage2_receive_bucket(self, specs: list[dict], nbytes: int) -> int:
        """Receive one flat bucket from the learner (the last rank) and load it; returns tensors loaded."""
        import torch

        from toolkit.rollout.load_plan import load_weights
        from toolkit.rollout.weight_sync import TensorSpec, unpack_bucket

        group = self._stage2_require()
        device = torch.device("cuda", torch.cuda.current_device()) if group.backend == "nccl" else torch.device("cpu")
        flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
        group.broadcast(flat, src=group.world_size - 1)
        tensors = unpack_bucket(flat, [TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in specs])
        return load_weights(self.model_runner.model, tensors)

    def stage2_close_group(self) -> None:
        group = getattr(self, "_stage2_group", None)
        self._stage2_group = None
        if group is not None:
            group.close()

    def _stage2_require(self):
        group = getattr(self, "_stage2_group", None)
        if group is None:
            raise RuntimeError("weight-sync group not initialized (fix: POST /init_communicator/ first)")
        return group
