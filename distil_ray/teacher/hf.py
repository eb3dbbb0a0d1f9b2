"""Teacher scoring with a Hugging Face causal LM: the teacher's top-k log-probs at every position of
the student's response, given the teacher's own context (prompt + feedback).

The sequence scored is ``teacher_prompt_ids + response_ids`` — the student's response *token ids*,
never re-tokenised text — so position t of the result lines up with the student's token t.
Log-probs are normalised over the full vocabulary; the logits are formed a chunk of positions at a
time, so ``[T, V]`` never exists at once for long responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from distil_ray.models.lm_head import output_embedding


@dataclass
class TeacherScores:
    topk_ids: torch.Tensor  # [T, k] int64
    topk_logprobs: torch.Tensor  # [T, k] float32, normalised over the full vocabulary
    token_logprobs: torch.Tensor  # [T]   teacher log-prob of the student's sampled token


@torch.no_grad()
def score_topk(
    model,
    teacher_prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    k: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> list[TeacherScores]:
    """Score each (teacher prompt, response) pair; one forward per pair (no padding to get wrong).
    Call it with the model in eval mode: dropout would add noise to the teacher's log-probs."""
    if len(teacher_prompt_ids) != len(response_ids):
        raise ValueError("one teacher prompt per response")
    weight = output_embedding(model)
    body = model.get_decoder()
    device = weight.device
    out = []
    for prompt, response in zip(teacher_prompt_ids, response_ids):
        if len(prompt) == 0:
            raise ValueError("the teacher prompt is empty: the first response token has no state")
        if len(response) == 0:  # nothing to score: skip the forward pass
            empty = torch.zeros(0, min(k, weight.shape[0]))
            out.append(TeacherScores(empty.long(), empty, torch.zeros(0)))
            continue
        ids = torch.tensor([list(prompt) + list(response)], device=device)
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state[0]
        # the state that predicts response token t sits one position earlier
        states = hidden[len(prompt) - 1 : len(prompt) - 1 + len(response)]
        targets = ids[0, len(prompt) :]
        top_ids, top_lp, tok_lp = [], [], []
        for start in range(0, len(response), chunk_size):
            logits = (states[start : start + chunk_size] @ weight.T).float() / temperature
            logp = torch.log_softmax(logits, -1)
            lp, idx = logp.topk(min(k, logp.shape[-1]), -1)
            top_ids.append(idx)
            top_lp.append(lp)
            tok_lp.append(logp.gather(-1, targets[start : start + chunk_size, None])[:, 0])
        out.append(TeacherScores(torch.cat(top_ids).cpu(), torch.cat(top_lp).cpu(), torch.cat(tok_lp).cpu()))
    return out
