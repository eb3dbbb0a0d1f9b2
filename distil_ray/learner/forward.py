"""Policy forward pass for the learner: log-probs of response tokens from a causal LM, computed with
the chunked :func:`gather_logprobs` so that ``[tokens, vocab]`` logits never exist at once.

Positions follow the input: the token at position ``p`` is predicted by the hidden state at
``p − 1``, so a response token at ``p`` reads ``hidden[p − 1]``. Every output is ``[B, L]`` (or
``[B, L, K]``) aligned with ``input_ids`` and zero outside ``response_mask``; the losses take them
as they are, with ``response_mask`` as their mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distil_ray.learner.attention import cu_seq_lens
from distil_ray.learner.logprobs import gather_logprobs
from distil_ray.models.lm_head import output_embedding


@dataclass
class ResponseLogprobs:
    token_logprobs: Tensor  # [B, L]   log π(y_p | s_p) at response positions (differentiable)
    topk_logprobs: Tensor | None  # [B, L, K] log π at the given top-k ids (differentiable)
    entropy: Tensor  # [B, L]   entropy of π at response positions (no grad)
    own_topk_ids: Tensor | None = None  # [B, L, k'] π's own most likely ids (no grad), with own_topk
    own_topk_logprobs: Tensor | None = None  # [B, L, k'] and their log π (no grad)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over real tokens, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    topk_ids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    packed: bool = False,
    own_topk: int = 0,
) -> ResponseLogprobs:
    """Log-probs of the response tokens of ``input_ids`` under ``model`` (a HF causal LM).

    ``topk_ids`` (``[B, L, K]``, aligned like ``input_ids``) are the teacher's top-k ids for each
    response position; the student's log-probs at those ids come back in ``topk_logprobs``.

    ``packed``: the forward runs on the real tokens only, every row's tokens concatenated into one
    sequence whose position ids restart at each row, with no attention mask: transformers then
    attends within each row only and no padded position is computed. The outputs keep the padded
    layout. ``own_topk`` > 0 also returns π's own top-``own_topk`` ids and log-probs per response
    position (what a teacher scored on the learner hands the loss). With the model's default ``sdpa`` attention transformers builds a dense block-diagonal
    mask over the packed sequence (exact, but attention over all N² pairs); with
    :data:`~distil_ray.learner.attention.PACKED_ATTENTION` (what the learner sets) or
    ``flash_attention_2`` attention reads the row boundaries (``cu_seq_lens``) instead.
    """
    if response_mask[:, 0].any():
        raise ValueError("a response token at position 0 has no state to predict it from")
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    positions = position_ids_from_mask(attention_mask)
    rows, cols = response_mask.bool().nonzero(as_tuple=True)
    if packed:
        real = attention_mask.bool()
        # the rows' boundaries in the pack, for attention that reads them (varlen kernels)
        cu, longest = cu_seq_lens(real.sum(1))
        hidden_packed = body(input_ids=input_ids[real][None], position_ids=positions[real][None],
                             attention_mask=None, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                             max_length_q=longest, max_length_k=longest).last_hidden_state[0]
        # where each real (row, column) sits in the packed sequence
        index = torch.full(input_ids.shape, -1, dtype=torch.long, device=input_ids.device)
        index[real] = torch.arange(int(real.sum()), device=input_ids.device)
        states = hidden_packed[index[rows, cols - 1]]  # the prompt precedes every response token
    else:
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                      use_cache=False).last_hidden_state
        states = hidden[rows, cols - 1]
    gathered = gather_logprobs(
        states,
        output_embedding(model),
        input_ids[rows, cols],
        None if topk_ids is None else topk_ids[rows, cols],
        temperature=temperature,
        chunk_size=chunk_size,
        with_student_topk=own_topk,
    )

    def scatter(values: Tensor, shape) -> Tensor:
        out = values.new_zeros(shape)
        out[rows, cols] = values  # index_put keeps the graph: gradients flow back to `values`
        return out

    B, L = input_ids.shape
    topk = None
    if topk_ids is not None:
        topk = scatter(gathered.topk_logprobs, (B, L, topk_ids.shape[-1]))
    own_ids = own_lp = None
    if own_topk:
        own_ids = scatter(gathered.student_topk_ids, (B, L, own_topk))
        own_lp = scatter(gathered.student_topk_logprobs, (B, L, own_topk))
    return ResponseLogprobs(
        token_logprobs=scatter(gathered.token_logprobs, (B, L)),
        topk_logprobs=topk,
        entropy=scatter(gathered.entropy, (B, L)),
        own_topk_ids=own_ids,
        own_topk_logprobs=own_lp,
    )
