"""The learner's collectives are served under NCCL: NCCL handles CUDA tensors only, so every
tensor a train step hands to a collective itself (counts, timings, metric sums, pickled metrics)
must be on a device the GPU process group has a backend for. Recorded on the CPU (gloo), checked
against the backend map torch builds for the string the worker gives ``init_process_group``."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, BackendConfig

from distil_ray.config import AlgorithmConfig, LearnerConfig
from distil_ray.learner.worker import LearnerWorker, Rendezvous, process_group_backend
from distil_ray.models import load_tiny, tiny_model_dir

from .learner_data import make_records
from .test_worker import free_port

RECORDED = ("all_reduce", "all_gather_object", "broadcast", "broadcast_object_list", "all_gather",
            "reduce", "gather_object")


def devices_served(backend: str) -> set[str]:
    return set(BackendConfig(Backend(backend)).get_device_backend_map())


def test_the_gpu_group_has_a_backend_for_cpu_tensors():
    assert devices_served(process_group_backend("nccl")) == {"cpu", "cuda"}
    assert process_group_backend("gloo") == "gloo"
    assert "cpu" not in devices_served("nccl")  # what a plain NCCL group would have refused


@pytest.mark.timeout(240)
@pytest.mark.parametrize("algorithm", ["distil", "grpo"])
def test_every_collective_of_a_step_is_served_by_the_gpu_group(monkeypatch, algorithm):
    path = tiny_model_dir()
    model, tok = load_tiny(path)
    records = make_records(model, tok, n_prompts=2, samples=2, seed=5)
    worker = LearnerWorker(str(path), LearnerConfig(world_size=1, micro_batch_size=2),
                           AlgorithmConfig(algorithm), Rendezvous(0, 1, "127.0.0.1", free_port()))
    seen: list[tuple[str, str]] = []
    for name in RECORDED:
        original = getattr(dist, name)

        def recording(*args, _original=original, _name=name, **kwargs):
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            # object collectives pickle into a tensor on the device torch picks: the CPU when the
            # group has a CPU backend (torch's rule), else the first one
            seen.append((_name, tensor.device.type if tensor is not None else "cpu"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(dist, name, recording)
    try:
        worker.train_step(records)
    finally:
        monkeypatch.undo()
        worker.close()
    assert {name for name, _ in seen} >= {"all_reduce", "all_gather_object"}  # the step's bookkeeping ran
    served = devices_served(process_group_backend("nccl"))
    assert all(device in served for _, device in seen), seen


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_a_train_step_under_nccl_on_the_gpu():
    """The real thing where a GPU is at hand: the worker on NCCL (cpu:gloo,cuda:nccl) in bfloat16
    with checkpointing and a token budget takes a finite step."""
    path = tiny_model_dir()
    model, tok = load_tiny(path)
    records = make_records(model, tok, n_prompts=2, samples=3, seed=6)
    cfg = LearnerConfig(world_size=1, num_gpus=1, backend="nccl", dtype="bfloat16", micro_batch_size=2,
                        activation_checkpointing=True, max_tokens_per_micro_batch=64)
    worker = LearnerWorker(str(path), cfg, AlgorithmConfig("distil", {"baseline": "group"}),
                           Rendezvous(0, 1, "127.0.0.1", free_port()))
    try:
        assert dist.get_backend() == "cpu:gloo,cuda:nccl"
        metrics = worker.train_step(records)
    finally:
        worker.close()
    assert torch.isfinite(torch.tensor([metrics["loss"], metrics["grad_norm"]])).all()
    assert metrics["learner/peak_memory_mb"] > 0
