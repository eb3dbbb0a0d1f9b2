"""A weight sync's payload: bfloat16 weights travel as int16 bit patterns (numpy has no bfloat16),
half the bytes of float32, and come back bit for bit; an engine in bfloat16 then holds exactly
what casting the float32 master weights would have given it."""

import pickle

import numpy as np
import torch

from distil_ray.engines import EngineOptions
from distil_ray.engines.base import Weights, as_weights
from distil_ray.engines.hf import HFEngine
from distil_ray.models import tiny_model_dir


def test_bfloat16_round_trip_is_exact_and_half_the_bytes():
    gen = torch.Generator().manual_seed(0)
    master = {"a.weight": torch.randn(7, 5, generator=gen), "b.bias": torch.randn(3, generator=gen)}
    full = Weights.from_tensors(master, "float32")
    half = pickle.loads(pickle.dumps(Weights.from_tensors(master, "bfloat16")))  # as through the object store
    assert half.nbytes * 2 == full.nbytes
    assert all(a.dtype == np.int16 for a in half.arrays.values())
    for name, tensor in half.tensors():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, master[name].to(torch.bfloat16))
    for name, tensor in full.tensors():
        assert torch.equal(tensor, master[name])
    plain = as_weights({"a.weight": master["a.weight"].numpy()})
    assert torch.equal(dict(plain.tensors())["a.weight"], master["a.weight"])


def test_a_bfloat16_engine_loads_the_cast_master_weights():
    engine = HFEngine(str(tiny_model_dir()), EngineOptions(dtype="bfloat16"))
    gen = torch.Generator().manual_seed(1)
    master = {n: torch.randn(p.shape, generator=gen) for n, p in engine.model.named_parameters()}
    engine.load_weights(Weights.from_tensors(master, "bfloat16").tensors())
    for name, p in engine.model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, master[name].to(torch.bfloat16))
