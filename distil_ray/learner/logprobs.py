"""Log-probabilities of chosen tokens without materialising the full ``[tokens, vocab]`` logits.

The learner needs, per position, log π at the sampled token and at the teacher's top-k ids, where
π = softmax(hidden @ weightᵀ / T). Computing that naively holds ``N × V`` logits (and their
softmax, and their gradient) at once: for Qwen3 (V = 151,936) and 8k tokens that is 5 GB in
float32 before the backward pass doubles it.

:func:`gather_logprobs` instead walks over the rows in chunks, in the forward *and* the backward
pass. The forward keeps only one ``[chunk, V]`` block alive at a time and saves, per row, nothing
but the log-normaliser; the backward recomputes each block's logits from ``hidden`` and
``weight`` and turns them straight into that block's contribution to both gradients. Peak extra
memory is therefore ``O(chunk_size × V)`` instead of ``O(N × V)``, for one extra matmul.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["GatheredLogprobs", "gather_logprobs"]


class GatheredLogprobs(NamedTuple):
    """What :func:`gather_logprobs` returns (a tuple, so ``tok, topk = result[:2]`` works)."""

    token_logprobs: Tensor  # [N]     log π(token_ids); differentiable
    topk_logprobs: Tensor | None  # [N, K]  log π(topk_ids); differentiable; None without topk_ids
    entropy: Tensor  # [N]     entropy of π; no grad (a metric)
    student_topk_ids: Tensor | None  # [N, k'] π's own top-k' ids; no grad; None when k' = 0
    student_topk_logprobs: Tensor | None  # [N, k'] and their log π; no grad; None when k' = 0


def gather_logprobs(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    topk_ids: Tensor | None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    with_student_topk: int = 0,
) -> GatheredLogprobs:
    """Gather log π at ``token_ids`` and ``topk_ids``, π = softmax(hidden @ weightᵀ / T).

    Args:
        hidden: ``[N, H]`` final hidden states (one row per token position).
        weight: ``[V, H]`` output-embedding (LM head) matrix. It may be frozen
            (``requires_grad=False``); its gradient is then not computed.
        token_ids: ``[N]`` ids whose log-probs are wanted (usually the sampled tokens).
        topk_ids: ``[N, K]`` further ids per row (usually the teacher's top-k), or None.
            Ids may repeat, within a row and with ``token_ids``; gradients add up accordingly.
        temperature: T, which divides the logits (the sampling temperature of the policy).
        chunk_size: rows processed at once; peak extra memory is about
            ``2 × chunk_size × V`` floats in the forward and one such block in the backward.
        with_student_topk: if > 0, also return π's own top-``with_student_topk`` ids and
            log-probs per row.

    Logits and softmax are computed in float32 (float64 inputs stay float64). For bfloat16 and
    float16 inputs the matmuls run in the input dtype and their results are upcast, as a model's
    own LM head would produce them; the weight gradient is then accumulated in float32 (on CUDA with TF32
    inputs, see :func:`_accumulate_weight_grad`).
    """
    n, v = _check_inputs(hidden, weight, token_ids, topk_ids, temperature, chunk_size,
                         with_student_topk)

    # One id matrix: column 0 is the token, columns 1.. the top-k. A single gather (and a single
    # scatter_add in the backward) then handles every id, including repeated ones.
    ids = token_ids.reshape(n, 1).long()
    if topk_ids is not None:
        ids = torch.cat([ids, topk_ids.long()], dim=1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
        raise ValueError(f"token_ids/topk_ids must lie in [0, {v}) (the vocabulary size)")

    gathered, entropy, student_ids, student_logprobs = _ChunkedLogprobs.apply(
        hidden, weight, ids, float(temperature), int(chunk_size), int(with_student_topk))
    return GatheredLogprobs(
        token_logprobs=gathered[:, 0],
        topk_logprobs=None if topk_ids is None else gathered[:, 1:],
        entropy=entropy,
        student_topk_ids=student_ids if with_student_topk else None,
        student_topk_logprobs=student_logprobs if with_student_topk else None,
    )


def _check_inputs(hidden, weight, token_ids, topk_ids, temperature, chunk_size, student_k):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"hidden is [N, {h}] but weight is [V, {weight.shape[1]}]: "
                         "the hidden sizes differ")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share one floating dtype, got {hidden.dtype} "
                        f"and {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    for name, ids, shape in (("token_ids", token_ids, (n,)),
                             ("topk_ids", topk_ids, None if topk_ids is None else (n, -1))):
        if ids is None:
            continue
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
        if ids.dim() != len(shape) or ids.shape[0] != n:
            want = "[N]" if len(shape) == 1 else "[N, K]"
            raise ValueError(f"{name} must be {want} with N = {n}, got shape {tuple(ids.shape)}")
        if ids.device != hidden.device:
            raise ValueError(f"{name} is on {ids.device} but hidden is on {hidden.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 0 <= student_k <= v:
        raise ValueError(f"with_student_topk must be in [0, V={v}], got {student_k}")
    return n, v


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits_into(out: Tensor, hidden_chunk: Tensor, weight: Tensor) -> Tensor:
    """``out[:] = hidden_chunk @ weightᵀ`` in ``out``'s dtype, reusing ``out``'s memory."""
    if out.dtype == weight.dtype:
        return torch.mm(hidden_chunk, weight.T, out=out)
    return out.copy_(hidden_chunk @ weight.T)


def _accumulate_weight_grad(grad_weight: Tensor, grad_z: Tensor, hidden_chunk: Tensor) -> None:
    """``grad_weight += grad_zᵀ @ hidden_chunk`` in ``grad_weight``'s dtype.

    For 16-bit training on CUDA this is the largest GEMM of the LM head, and in plain float32 (TF32
    off by default) ~10-15 % of a step. There it runs with TF32 inputs and float32 accumulation in
    place: ~7x the float32 rate on tensor cores, more precise than bfloat16 inputs, and no
    ``[V, H]`` temporary. Float32/64 training and the CPU stay exact.
    """
    a, b = grad_z.T, hidden_chunk.to(grad_weight.dtype)
    if grad_weight.is_cuda and hidden_chunk.dtype in (torch.bfloat16, torch.float16):
        matmul = torch.backends.cuda.matmul
        previous = matmul.fp32_precision
        matmul.fp32_precision = "tf32"
        try:
            grad_weight.addmm_(a, b)
        finally:
            matmul.fp32_precision = previous
    else:
        grad_weight.addmm_(a, b)


class _ChunkedLogprobs(torch.autograd.Function):
    """Row-chunked ``log_softmax(hidden @ weightᵀ / T).gather(1, ids)`` with a matching backward.

    With z = hidden @ weightᵀ / T and lse = logsumexp(z), log π(i) = z_i − lse. For upstream
    gradients g over the gathered ids of one row, dL/dz = scatter_add(g at ids) − π · Σg, and
    then dL/dhidden = (dL/dz) @ weight / T and dL/dweight = (dL/dz)ᵀ @ hidden / T.
    """

    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, chunk_size, student_k):
        n, v = hidden.shape[0], weight.shape[0]
        dtype = _compute_dtype(hidden.dtype)
        dev = hidden.device
        # Scale the small [N, H] hidden states rather than every [chunk, V] block of logits.
        scaled = hidden if temperature == 1.0 else hidden / temperature

        gathered = torch.empty(ids.shape, dtype=dtype, device=dev)
        lse = torch.empty(n, 1, dtype=dtype, device=dev)
        entropy = torch.empty(n, dtype=dtype, device=dev)
        student_ids = torch.empty(n, student_k, dtype=torch.long, device=dev)
        student_logprobs = torch.empty(n, student_k, dtype=dtype, device=dev)

        # The two [chunk, V] blocks, allocated once and reused: the only large memory we use.
        rows = min(chunk_size, n)
        logits_buf = torch.empty(rows, v, dtype=dtype, device=dev)
        exp_buf = torch.empty(rows, v, dtype=dtype, device=dev)

        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            c = end - start
            z = _logits_into(logits_buf[:c], scaled[start:end], weight)
            gathered[start:end] = z.gather(1, ids[start:end])
            if student_k:
                top_z, student_ids[start:end] = z.topk(student_k, dim=1)
                student_logprobs[start:end] = top_z
            # Stable logsumexp and entropy from one exp pass: with m = max z, e = exp(z − m),
            # S = Σe, we have lse = m + log S and entropy = log S − Σ e (z − m) / S.
            m = z.amax(dim=1, keepdim=True)
            z.sub_(m)
            e = torch.exp(z, out=exp_buf[:c])
            s = e.sum(dim=1, keepdim=True)
            # Row-wise dot product as a batched [1, V] @ [V, 1] matmul: no [chunk, V] temporary.
            e_dot_z = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(c, 1)
            log_s = s.log()
            lse[start:end] = m + log_s
            entropy[start:end] = (log_s - e_dot_z / s).view(c)

        del logits_buf, exp_buf
        gathered.sub_(lse)
        student_logprobs.sub_(lse)

        ctx.save_for_backward(hidden, weight, ids, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy, student_ids, student_logprobs)
        return gathered, entropy, student_ids, student_logprobs

    @staticmethod
    @once_differentiable  # the backward reuses buffers in place: it cannot itself be differentiated
    def backward(ctx, grad_gathered, _grad_entropy, _grad_ids, _grad_student_logprobs):
        hidden, weight, ids, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        if not (want_hidden or want_weight):
            return None, None, None, None, None, None

        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        n, v = hidden.shape[0], weight.shape[0]
        dtype = lse.dtype
        scaled = hidden if temperature == 1.0 else hidden / temperature
        grad_gathered = grad_gathered.to(dtype)

        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # Accumulate in the compute dtype: summing many chunks in bfloat16 would lose precision.
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) \
            if want_weight else None
        grad_logits_buf = torch.empty(min(chunk_size, n), v, dtype=dtype, device=hidden.device)

        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            c = end - start
            g = grad_gathered[start:end]
            # dL/dz = scatter_add(g) − π · Σg, built in place in the recomputed logits block.
            grad_z = _logits_into(grad_logits_buf[:c], scaled[start:end], weight)
            grad_z.sub_(lse[start:end]).exp_().mul_(-g.sum(dim=1, keepdim=True))
            grad_z.scatter_add_(1, ids[start:end], g)

            if want_hidden:
                # The 1/T of z = hidden @ weightᵀ / T is applied to the small [c, H] result.
                grad_z_mm = grad_z if grad_z.dtype == weight.dtype else grad_z.to(weight.dtype)
                out = grad_hidden[start:end]
                torch.mm(grad_z_mm, weight, out=out)
                if temperature != 1.0:
                    out.div_(temperature)
            if want_weight:
                _accumulate_weight_grad(grad_weight, grad_z, scaled[start:end])  # `scaled` carries the 1/T

        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None
