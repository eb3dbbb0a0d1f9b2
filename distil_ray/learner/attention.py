"""Attention over packed sequences without an ``N × N`` mask.

A packed forward (``learner.packed_sequences``) concatenates a micro-batch's rows into one
sequence whose position ids restart at every row. With transformers' ``sdpa`` attention that needs
a dense block-diagonal mask over all N² pairs of the pack, and SDPA with an explicit mask cannot use
the flash kernel. :func:`packed_attention`, registered with transformers as :data:`PACKED_ATTENTION`,
attends within each row only instead:

* on CUDA in 16-bit, with torch's variable-length flash attention (``varlen_attn``, the kernel
  of flash-attention's ``*_varlen_func``), from the row boundaries ``cu_seq_lens``;
* elsewhere (the CPU, float32/64) with one causal SDPA per row: exact, Σ Lᵢ² work instead of N².

The row boundaries come in as transformers' ``cu_seq_lens_q`` / ``max_length_q`` keyword arguments
(what :func:`~distil_ray.learner.forward.response_logprobs` passes); without them they are read off
the position ids, each restart of the count starting a new row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PACKED_ATTENTION = "distil_ray_packed"


def cu_seq_lens(lengths: Tensor) -> tuple[Tensor, int]:
    """``[0, L₀, L₀+L₁, ...]`` (int32, as the varlen kernels take it) and the longest length."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = lengths.cumsum(0)
    return cu, int(lengths.max()) if len(lengths) else 0


def _boundaries_from_positions(position_ids: Tensor) -> tuple[Tensor, int]:
    starts = torch.ones_like(position_ids[0], dtype=torch.bool)
    starts[1:] = position_ids[0, 1:] != position_ids[0, :-1] + 1
    edges = torch.cat([starts.nonzero()[:, 0], torch.tensor([position_ids.shape[1]], device=position_ids.device)])
    return cu_seq_lens(edges.diff())


def packed_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
                     **kwargs) -> tuple[Tensor, None]:
    """Causal attention within each packed row. ``query``: ``[1, Hq, N, D]``; ``key``/``value``:
    ``[1, Hkv, N, D]``; returns ``[1, N, Hq, D]`` as transformers' attention functions do."""
    if attention_mask is not None or query.shape[0] != 1:
        raise ValueError(f"{PACKED_ATTENTION} attention takes one packed sequence without a mask "
                         "(learner.packed_sequences); got a batch or a padding mask")
    if sliding_window is not None or dropout:
        raise ValueError(f"{PACKED_ATTENTION} attention supports full-attention layers without dropout only")
    # what changes the result and this function does not implement (Gemma's soft-capping, attention
    # sinks): refuse rather than silently compute plain attention
    unsupported = [k for k in ("softcap", "s_aux", "sinks") if kwargs.get(k) is not None]
    if unsupported:
        raise ValueError(f"{PACKED_ATTENTION} attention does not implement {', '.join(unsupported)}; "
                         "set learner.packed_sequences=false for this model")
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        cu, longest = _boundaries_from_positions(kwargs["position_ids"])
    else:
        longest = int(kwargs["max_length_q"])
    gqa = query.shape[1] != key.shape[1]
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, H, D]
        cu = cu.to(device=query.device, dtype=torch.int32)
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0), enable_gqa=gqa)
        return out[None], None
    edges = cu.tolist()
    rows = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                           is_causal=True, scale=scaling, enable_gqa=gqa)
            for s, e in zip(edges[:-1], edges[1:]) if e > s]
    return torch.cat(rows, dim=2).transpose(1, 2), None


def register() -> str:
    """Make :data:`PACKED_ATTENTION` a name transformers models accept; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    return PACKED_ATTENTION
