"""The learner's side of ``weight_sync.backend=collective``: vLLM's weight-transfer protocol.

Learner rank 0 opens a process group with every engine worker (it is rank 0 of that group, the
engines follow) and drives the engines through their actors' ``weight_transfer`` method (the
:class:`EngineActors` client). Each sync, every learner rank walks the parameters in order,
all-gathering one FSDP2 shard set at a time (a collective among the learner ranks) and casting it
to the engines' dtype; rank 0 packs and broadcasts them bucket by bucket while the engines receive
and load. No rank ever builds the full state dict.

The transport is vLLM's ``nccl`` engine where the learner runs NCCL (the GPUs), and
:mod:`distil_ray.engines.gloo_transfer` (the same protocol over gloo) on the CPU.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch

from distil_ray.learner.worker import free_port


def sharded_weights(named: Callable[[], Iterable[tuple[str, torch.Tensor]]], dtype: torch.dtype):
    """A vLLM ``WeightSource`` over the (HF name, FSDP2-sharded tensor) pairs ``named()`` gives (the
    policy's parameters, or their moving average) in ``dtype``: the metadata from the global shapes
    (no gather), each iteration all-gathering one tensor at a time."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource, materialize_full_tensor

    class ShardedWeights(WeightSource):
        def metadata(self) -> list:
            return [ParamMeta(name, dtype, tuple(t.shape)) for name, t in named()]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            with torch.no_grad():
                for name, t in named():
                    # cast the shard, then gather: half the traffic and memory for bfloat16 engines
                    yield name, materialize_full_tensor(t.detach().to(dtype))

    return ShardedWeights()


class EngineActors:
    """vLLM's ``VLLMWeightSyncClient`` over Ray actors that hold engines (rollout workers, the
    teacher): each call goes to every actor at once and waits, with a deadline. Each engine has one
    worker, so actor ``i`` is rank ``rank_offset + i`` of the transfer group."""

    def __init__(self, actors: Sequence, timeout_s: float):
        self.actors = list(actors)
        self.timeout_s = timeout_s
        self.version: int | None = None  # what the engines report after the next finish

    def _call(self, phase: str, infos: list | None = None) -> None:
        import ray

        infos = infos or [None] * len(self.actors)
        refs = [a.weight_transfer.remote(phase, info, self.version) for a, info in zip(self.actors, infos)]
        try:
            ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"weight transfer: the engines' {phase!r} did not finish within "
                               f"{self.timeout_s:.0f} s (weight_sync.timeout_s)") from None

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        offset = int(init_info["rank_offset"])
        self._call("init", [dict(init_info, rank_offset=offset + i) for i in range(len(self.actors))])

    # One sync is one actor call per engine: start, receive and finish run back to back inside it,
    # so nothing else the actor serves (a rollout stream, a teacher batch) can run while vLLM's
    # layerwise reload has the layers' weights on the meta device. start and finish are therefore
    # part of update_weights, which the trainer engine runs while it sends.

    def start_weight_update(self) -> None:
        pass

    def update_weights(self, update_info) -> None:
        self._call("receive", [update_info] * len(self.actors))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        pass

    def shutdown(self) -> None:
        self._call("shutdown")


def vllm_backend(learner_backend: str) -> str:
    """The engines' weight-transfer backend for ``learner.backend``."""
    from distil_ray.engines.gloo_transfer import BACKEND

    return "nccl" if learner_backend == "nccl" else BACKEND


class Channel:
    """One learner rank's end of a transfer group to a set of engine actors; ``named()`` gives the
    (name, sharded tensor) pairs it sends."""

    def __init__(self, named: Callable[[], Iterable[tuple[str, torch.Tensor]]], dtype: torch.dtype, *, rank: int,
                 learner_backend: str, actors: Sequence, bucket_bytes: int, timeout_s: float, address: str):
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        self.client = EngineActors(actors, timeout_s)
        world_size = 1 + len(self.client.actors)
        port = free_port() if rank == 0 else 0
        if vllm_backend(learner_backend) == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            info = NCCLTrainerInitInfo(address, port, world_size, packed=True,
                                       packed_buffer_size_bytes=bucket_bytes, rank=rank)
        else:
            from distil_ray.engines.gloo_transfer import GlooTrainerInitInfo, register

            register()
            info = GlooTrainerInitInfo(address, port, world_size, bucket_bytes=bucket_bytes, timeout_s=timeout_s,
                                       rank=rank)
        self.engine = WeightTransferTrainerFactory.trainer_init(info, client=self.client,
                                                                source=sharded_weights(named, dtype))

    def send(self, version: int) -> None:
        self.client.version = int(version)
        self.engine.send_weights()

    def close(self) -> None:
        self.engine.shutdown()
        if self.engine.is_sender:
            self.client.shutdown()
