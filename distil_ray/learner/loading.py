"""Sharded loading: no rank ever holds the whole model on its device.

Every rank builds the model with its *parameters on the meta device* (no memory, no random
initialisation) and its buffers real, shards it with FSDP2, and only then allocates its own
shards on the device. Rank 0 reads the checkpoint into host memory and broadcasts it one tensor
at a time; each rank keeps its slice (``set_model_state_dict(..., broadcast_from_rank0=True)``).
Device memory per rank is therefore the shard plus one full tensor in flight, instead of the
whole float32 model (32 GB for an 8B model) before ``fully_shard`` could cut it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside register their parameters on the meta device; buffers stay real.

    Buffers are kept because some are not in any checkpoint (rotary ``inv_freq`` is computed from
    the config at construction); a module's ``reset_parameters`` then runs on meta tensors, which
    costs nothing.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            cls = type(param)
            module._parameters[name] = cls(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_causal_lm(model_path: str) -> nn.Module:
    """The model of ``model_path`` in float32 with parameters on meta (see :func:`parameters_on_meta`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def materialise_and_load(root: nn.Module, model: nn.Module, model_path: str, device: torch.device) -> None:
    """Allocate this rank's shards on ``device`` and fill them from ``model_path`` (collective).

    ``model`` is the result of :func:`empty_causal_lm`, sharded, and ``root`` the outermost FSDP
    unit around it (allocated through it, so every unit re-links its shards). Rank 0 alone reads
    the float32 checkpoint, into host memory.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    # ``to_empty`` replaces buffers too: keep their values (non-persistent ones are in no file).
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    root.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    full: dict[str, torch.Tensor] = {}
    if dist.get_rank() == 0:
        full = AutoModelForCausalLM.from_pretrained(
            model_path, local_files_only=True, dtype=torch.float32).state_dict()
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
