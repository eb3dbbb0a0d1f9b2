"""Sharded loading with two real gloo ranks (two processes, no Ray): rank 0 alone reads the
checkpoint, every rank holds only its shards, and the assembled model equals the file exactly."""

import multiprocessing as mp
import traceback

import pytest
import torch
from torch import nn

from distil_ray.config import AlgorithmConfig, LearnerConfig
from distil_ray.learner.loading import parameters_on_meta
from distil_ray.models import tiny_model_dir

from .test_worker import free_port


def test_parameters_on_meta_keeps_buffers_and_ties():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight
            self.register_buffer("scale", torch.arange(3.0), persistent=False)

    with parameters_on_meta():
        m = Tied()
    assert all(p.device.type == "meta" for p in m.parameters())
    assert m.head.weight is m.embed.weight
    assert torch.equal(m.scale, torch.arange(3.0))  # a buffer no checkpoint holds keeps its value
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # the patch is gone outside the block


def _rank(rank: int, port: int, path: str, queue) -> None:
    try:
        from transformers import AutoModelForCausalLM

        from distil_ray.learner.worker import LearnerWorker, Rendezvous

        if rank == 1:
            def refuse(*args, **kwargs):
                raise AssertionError("rank 1 read the checkpoint")

            AutoModelForCausalLM.from_pretrained = refuse
        worker = LearnerWorker(path, LearnerConfig(world_size=2), AlgorithmConfig("distil"),
                               Rendezvous(rank, 2, "127.0.0.1", port))
        local = {name: p.to_local().numel() for name, p in worker.model.named_parameters()}
        full = {name: p.numel() for name, p in worker.model.named_parameters()}
        # numpy, not tensors: a tensor crosses processes by shared memory this process would take along
        state = {name: t.numpy() for name, t in worker._full_state_dict().items()}
        worker.close()
        queue.put((rank, local, full, state))
    except BaseException:
        queue.put((rank, traceback.format_exc(), None, None))


@pytest.mark.timeout(240)
def test_two_ranks_load_their_shards_of_the_checkpoint():
    from transformers import AutoModelForCausalLM

    path = str(tiny_model_dir())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, path, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, local, full, state = queue.get(timeout=200)
        assert full is not None, f"rank {rank} failed:\n{local}"
        results[rank] = (local, full, state)
    for p in procs:
        p.join(timeout=30)

    local0, full0, state = results[0]
    local1, _, _ = results[1]
    # each rank holds about half of every sharded tensor, together all of it
    assert all(local0[n] + local1[n] == full0[n] for n in full0)
    assert sum(local0.values()) < sum(full0.values())
    reference = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).state_dict()
    assert state.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(torch.from_numpy(state[name]), value), name
