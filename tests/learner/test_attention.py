"""Packed attention against a naive float64 reference: a dense causal mask that is block-diagonal
over the packed rows, with grouped-query heads, values and gradients."""

import math

import pytest
import torch

from distil_ray.learner.attention import PACKED_ATTENTION, cu_seq_lens, packed_attention, register

LENGTHS = [5, 1, 9, 3]  # a one-token row included
HQ, HKV, D = 4, 2, 8


def inputs(dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    q, k, v = (torch.randn(1, h, n, D, generator=gen, dtype=torch.float64) for h in (HQ, HKV, HKV))
    return [t.to(device, dtype).requires_grad_() for t in (q, k, v)]


def naive(q, k, v, scale):
    """softmax(q kᵀ · scale + mask) v with every (query, key) pair of the pack written out."""
    n = q.shape[2]
    doc = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    k, v = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [1, N, H, D]


def positions():
    return torch.cat([torch.arange(n) for n in LENGTHS])[None]


@pytest.mark.parametrize("boundaries", ["cu_seq_lens", "position_ids"])
def test_packed_attention_equals_the_dense_block_diagonal_mask(boundaries):
    q, k, v = inputs()
    scale = 1 / math.sqrt(D)
    cu, longest = cu_seq_lens(torch.tensor(LENGTHS))
    assert cu.tolist() == [0, 5, 6, 15, 18] and longest == 9
    kwargs = ({"cu_seq_lens_q": cu, "max_length_q": longest} if boundaries == "cu_seq_lens"
              else {"position_ids": positions()})
    out, weights = packed_attention(None, q, k, v, None, scaling=scale, **kwargs)
    assert weights is None
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = naive(q2, k2, v2, scale)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (q2, k2, v2))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_packed_attention_refuses_a_padding_mask():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="packed_sequences"):
        packed_attention(None, q, k, v, torch.ones(1, 1, q.shape[2], q.shape[2]), position_ids=positions())


def test_registered_with_transformers():
    from transformers import AttentionInterface

    assert register() == PACKED_ATTENTION
    assert AttentionInterface._global_mapping[PACKED_ATTENTION] is packed_attention


@pytest.mark.gpu
def test_cuda_varlen_kernel_matches_float64_reference():
    """bfloat16 on CUDA runs torch's varlen flash kernel; against the float64 reference."""
    q, k, v = inputs(torch.bfloat16, "cuda")
    scale = 1 / math.sqrt(D)
    cu, longest = cu_seq_lens(torch.tensor(LENGTHS, device="cuda"))
    out, _ = packed_attention(None, q, k, v, None, scaling=scale, cu_seq_lens_q=cu, max_length_q=longest)
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out.double() * upstream.cuda()).sum(), (q, k, v))
    q2, k2, v2 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref = naive(q2, k2, v2, scale)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (q2, k2, v2))
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double().cpu(), r, rtol=5e-2, atol=5e-2)
