"""A gloo backend for vLLM's weight-transfer API: learner rank 0 broadcasts to vLLM CPU engines.

vLLM (≥ 0.32) splits a weight update into init → start → update → finish and lets a backend plug
in on both sides: a :class:`WeightTransferEngine` inside each inference worker and a
:class:`TrainerWeightTransferEngine` in the trainer. Its built-in ``nccl`` backend serves GPUs;
this module is the same protocol over gloo, so the CPU path runs the code a GPU run runs, with
only the transport swapped.

The wire format is buckets. Parameters (HF names, already in the engine dtype) are grouped, in
metadata order, into buckets of at most ``bucket_bytes`` (a larger tensor is a bucket of its own),
each tensor at a 16-byte-aligned offset; both sides derive the same layout from the per-round
update info. The trainer copies each gathered tensor once into a reused send buffer and broadcasts
the bucket in one call; each worker receives it into one buffer, views it back as tensors and hands
them to the model's own ``load_weights`` (which maps HF names onto vLLM's fused layers). The sender
never holds more than one bucket beyond its shards.

Registered under :data:`BACKEND` in both of vLLM's factories by :func:`register`.
"""

from __future__ import annotations

from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

BACKEND = "distil_ray_gloo"
DEFAULT_BUCKET_BYTES = 32 << 20


def bucket_plan(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Consecutive indices grouped so each group's bytes stay within ``bucket_bytes`` (a tensor
    larger than that is a group of its own)."""
    buckets: list[list[int]] = []
    used = bucket_bytes  # start "full": the first tensor opens a bucket
    for i, size in enumerate(sizes):
        if used + size > bucket_bytes:
            buckets.append([])
            used = 0
        buckets[-1].append(i)
        used += size
    return buckets


# every tensor starts on this boundary inside a bucket, so a byte view of any dtype is aligned
ALIGN = 16


def _padded_nbytes(dtype_name: str, shape: list[int]) -> int:
    n = torch.Size(shape).numel() * getattr(torch, dtype_name).itemsize
    return -(-n // ALIGN) * ALIGN


def _open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(
        address, port, rank, world_size, backend="gloo", timeout=timedelta(seconds=timeout_s))


def _broadcast(group, buffer: torch.Tensor) -> None:
    # the group's own method: ranks are the group's, not the default group's
    group.broadcast(buffer, 0).wait()


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """Worker side: where the group meets and this worker's rank in it (rank 0 is the trainer)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 1800.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """One round: every parameter, in send order, and the bucket size that cuts them."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_bytes: int = DEFAULT_BUCKET_BYTES

    def __post_init__(self):
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"names, dtype_names and shapes differ in length: {len(self.names)}, "
                             f"{len(self.dtype_names)}, {len(self.shapes)}")

    def buckets(self) -> list[list[int]]:
        return bucket_plan([self.padded_nbytes(i) for i in range(len(self.names))], self.bucket_bytes)

    def padded_nbytes(self, i: int) -> int:
        return _padded_nbytes(self.dtype_names[i], self.shapes[i])

    def views(self, buffer: torch.Tensor, bucket: list[int]) -> list[tuple[str, torch.Tensor]]:
        """The bucket's tensors as views into its byte ``buffer`` (both sides lay it out so)."""
        out, at = [], 0
        for i in bucket:
            dtype = getattr(torch, self.dtype_names[i])
            n = torch.Size(self.shapes[i]).numel() * dtype.itemsize
            out.append((self.names[i], buffer[at:at + n].view(dtype).view(self.shapes[i])))
            at += self.padded_nbytes(i)
        return out


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """The inference worker's side: receive each bucket, load it through the model's loader."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        # tensor parallel workers of one engine take consecutive ranks after its offset
        rank = init_info.rank_offset + self.parallel_config.rank
        self.group = _open_group(init_info.master_address, init_info.master_port, rank,
                                 init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer: init_transfer_engine was not called")
        for bucket in update_info.buckets():
            # a fresh buffer per bucket: the layerwise loader may hold a layer's tensors until the
            # layer is complete, and a layer can span buckets
            buffer = torch.empty(sum(update_info.padded_nbytes(i) for i in bucket), dtype=torch.uint8)
            _broadcast(self.group, buffer)
            self.model.load_weights(update_info.views(buffer, bucket))

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer side: the group (trainer rank 0 plus ``world_size − 1`` engine workers) and the
    bucket size. ``rank`` is the trainer rank: rank 0 sends, the others only join the gathers."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 1800.0


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """The trainer's side: iterate the source (a collective on every trainer rank), and on rank 0
    pack each bucket and broadcast it while the workers receive."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source, is_sender: bool, bucket_bytes: int):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        if source is None:
            raise ValueError("gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                     bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        worker_info = GlooInitInfo(init_info.master_address, init_info.master_port, rank_offset=1,
                                   world_size=init_info.world_size, timeout_s=init_info.timeout_s)
        # the workers wait in the rendezvous inside init_weight_transfer_engine: meet them there;
        # whichever side fails first is reported at once, not after the other's timeout
        pool = ThreadPoolExecutor(max_workers=2)
        try:
            joined = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            opened = pool.submit(_open_group, init_info.master_address, init_info.master_port, 0,
                                 init_info.world_size, init_info.timeout_s)
            done, _ = wait([joined, opened], return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()
            engine.group = opened.result()
            joined.result()
        finally:
            pool.shutdown(wait=False)
        return engine

    def send_weights(self) -> None:
        meta: list[ParamMeta] = self.source.metadata()
        info = GlooUpdateInfo(names=[m.name for m in meta], dtype_names=[str(m.dtype).removeprefix("torch.") for m in meta],
                              shapes=[list(m.shape) for m in meta], bucket_bytes=self.bucket_bytes)
        if not self.is_sender:
            for _ in self.source:  # the gathers are collective: every trainer rank iterates
                pass
            return
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            received = pool.submit(self.client.update_weights, asdict(info))
            self._send(info)
            received.result()  # the workers' errors, if any
        finally:
            # never wait for the workers' call here: if sending failed they are still blocked in
            # the matching broadcast, and joining would turn the error into a hang
            pool.shutdown(wait=False)
        self.client.finish_weight_update()

    def _send(self, info: GlooUpdateInfo) -> None:
        pairs = iter(self.source)
        buckets = info.buckets()
        # one send buffer, reused: each gathered tensor is copied into it once, then it goes out
        largest = max((sum(info.padded_nbytes(i) for i in b) for b in buckets), default=0)
        buffer = torch.empty(largest, dtype=torch.uint8)
        for bucket in buckets:
            used = sum(info.padded_nbytes(i) for i in bucket)
            for (name, view), i in zip(info.views(buffer, bucket), bucket):
                got_name, tensor = next(pairs)
                got = (got_name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape))
                if got != (name, info.dtype_names[i], info.shapes[i]):
                    raise ValueError(f"weight source yielded {got}, its metadata declared "
                                     f"{(name, info.dtype_names[i], info.shapes[i])}")
                view.copy_(tensor.detach())
            _broadcast(self.group, buffer[:used])

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None


def register() -> str:
    """Make :data:`BACKEND` known to vLLM's worker and trainer factories (idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, cls in ((WeightTransferEngineFactory, GlooWeightTransferEngine),
                         (WeightTransferTrainerFactory, GlooTrainerWeightTransferEngine)):
        if BACKEND not in factory._registry:
            factory.register_engine(BACKEND, cls)
    return BACKEND
