"""Credit assignment: returns, baselines and group-relative advantages.

Pure tensor functions shared by the losses. Shapes: ``[B, T]`` per token, ``[B]`` per sequence;
``mask`` is 1 on response tokens. Rollouts of the same prompt share a ``group_id``.
"""

from __future__ import annotations

import torch

BASELINES = ("none", "group")


def future_returns(per_token: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = Σ_{i>t} γ^{i-t-1} x_i`` over response tokens only (strictly later tokens).

    The sum starts at ``t+1``: a token is charged for what it *caused* later, never for its own
    term (that one has its own direct gradient) and never for anything before it.
    """
    x = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    if gamma == 1.0:
        # suffix[t] = Σ_{i>=t} x_i; shifting by one drops x_t without a cancelling subtraction.
        suffix = x.flip(-1).cumsum(-1).flip(-1)
        return torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], dim=-1)
    returns = torch.zeros_like(x)
    for t in range(x.shape[-1] - 2, -1, -1):
        returns[:, t] = x[:, t + 1] + gamma * returns[:, t + 1]
    return returns


def response_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each token among its row's response tokens (0 for the first), whatever the padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def group_loo_baseline(values: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline: for rollout i at its t-th response token, the mean of the other
    rollouts' ``values`` at *their* t-th response token, over the other rollouts j of the same
    prompt that are that long (0 where none is).

    Positions are counted within each response, not by column, so left padding (which shifts a
    row's columns by its own length) cannot leak rollout i's length into its baseline.

    Why it keeps the expectation: ``b[i, t]`` is a function of the other rollouts only, which are
    sampled independently of rollout i given the prompt, so
    ``E[b · ∇log π(y_t|s_t)] = E[b] · E_{y_t~π(·|s_t)}[∇log π(y_t|s_t)] = E[b] · ∇Σ_v π(v|s_t) = 0``.
    """
    if group_ids is None:
        raise ValueError("baseline='group' needs group_ids (one id per rollout, shared by rollouts of a prompt)")
    group_ids = torch.as_tensor(group_ids, device=values.device)
    B = values.shape[0]
    m = mask.bool()
    rows = torch.arange(B, device=values.device)[:, None].expand_as(m)[m]
    pos = response_positions(mask)[m]
    width = int(pos.max()) + 1 if pos.numel() else 1
    # re-lay every response from position 0: aligned[i, t] is rollout i's t-th response token
    aligned = values.new_zeros(B, width).index_put_((rows, pos), values[m])
    present = values.new_zeros(B, width).index_put_((rows, pos), values.new_ones(pos.shape))
    same = group_ids[:, None] == group_ids[None, :]
    others = (same & ~torch.eye(B, dtype=torch.bool, device=values.device)).to(values.dtype)
    sums, counts = others @ aligned, others @ present
    loo = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    return values.new_zeros(values.shape).index_put_(m.nonzero(as_tuple=True), loo[rows, pos])


def credit_baseline(returns: torch.Tensor, mask: torch.Tensor, baseline: str, group_ids=None) -> torch.Tensor:
    """The baseline ``b_t`` subtracted from the future-credit return (never depends on ``y_t``)."""
    if baseline == "none":
        return torch.zeros_like(returns)
    if baseline == "group":
        return group_loo_baseline(returns, mask, group_ids)
    raise ValueError(f"baseline={baseline!r}: allowed values are {BASELINES}")


def group_relative_advantages(
    rewards: torch.Tensor, group_ids, *, normalize_std: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages: ``A_i = r_i − mean_{j∈g(i)} r_j`` (optionally ``/ (std_g + eps)``).

    A prompt with a single rollout has no relative signal: its advantage is 0. The std is the
    unbiased sample std of the group, as in the GRPO paper.
    """
    # float64 whatever comes in (ints, bools, bf16): means and stds of small groups need the precision
    rewards = torch.as_tensor(rewards).to(torch.float64)
    group_ids = torch.as_tensor(group_ids, device=rewards.device)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    sums = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
    means = sums / counts.to(rewards.dtype)
    centred = rewards - means[inverse]
    if not normalize_std:
        return centred
    sq = torch.zeros_like(sums).index_add_(0, inverse, centred**2)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1).to(rewards.dtype))
    return centred / (std[inverse] + eps)
