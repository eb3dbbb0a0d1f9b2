"""A prompt's group split across micro-batches gives the whole group's gradient, in float64:
each micro-batch of one sequence, the global denominator, and (distil's leave-one-out baseline)
the baseline computed over the whole group beforehand from every sibling's returns; GRPO's
advantages are a group statistic computed before the split, SDPO has none."""

import pytest
import torch

from distil_ray.algorithms import losses
from distil_ray.algorithms.advantages import group_loo_baseline, group_relative_advantages

B, T, K = 7, 6, 4
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1])


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, K + 3, generator=gen, dtype=torch.float64)
    student = torch.log_softmax(logits, -1)
    teacher = torch.log_softmax(torch.randn(B, T, K + 3, generator=gen, dtype=torch.float64), -1)[..., :K]
    lengths = torch.tensor([6, 3, 5, 1, 6, 4, 2])
    # left padding, as the learner lays rows out: the response ends at the last column
    mask = (torch.arange(T)[None, :] >= T - lengths[:, None]).to(torch.float64)
    behaviour = student[..., 0].detach() + 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    return logits.requires_grad_(), teacher, mask, behaviour


def whole_and_split(loss_fn, make_args, extra, split_extra):
    logits, teacher, mask, behaviour = inputs()
    denominator = float(mask.sum())  # token-mean over the global batch
    whole, _ = loss_fn(*make_args(logits, teacher, mask, behaviour, slice(None)), denominator=denominator,
                       **extra(slice(None)))
    (g_whole,) = torch.autograd.grad(whole, logits)
    split = sum(loss_fn(*make_args(logits, teacher, mask, behaviour, slice(i, i + 1)), denominator=denominator,
                        **split_extra(i))[0] for i in range(B))
    (g_split,) = torch.autograd.grad(split, logits)
    return whole, split, g_whole, g_split


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_distil_group_baseline_split_into_single_sequences(gamma):
    kwargs = dict(baseline="group", gamma=gamma, future_credit_coef=1.0, is_clip=2.0)

    def args(logits, teacher, mask, behaviour, rows):
        logp = torch.log_softmax(logits[rows], -1)
        return logp[..., 0], logp[..., :K], teacher[rows], mask[rows]

    logits, teacher, mask, behaviour = inputs()
    logp = torch.log_softmax(logits, -1)
    returns = losses.distil_returns(logp[..., :K], teacher, mask, gamma=gamma)
    baseline = group_loo_baseline(returns, mask, GROUPS)  # over the whole group, before the split
    assert baseline.abs().sum() > 0
    whole, split, g_whole, g_split = whole_and_split(
        losses.distil_loss, args,
        lambda rows: dict(kwargs, group_ids=GROUPS[rows], behaviour_logprobs=behaviour[rows]),
        lambda i: dict(kwargs, group_ids=GROUPS[i:i + 1], behaviour_logprobs=behaviour[i:i + 1],
                       credit_baseline_values=baseline[i:i + 1]))
    assert float(split.detach()) == pytest.approx(float(whole.detach()), abs=1e-12)
    assert torch.allclose(g_split, g_whole, atol=1e-9, rtol=0)
    # without the precomputed baseline a single sequence has no sibling: b = 0, another gradient
    _, _, _, g_naive = whole_and_split(
        losses.distil_loss, args,
        lambda rows: dict(kwargs, group_ids=GROUPS[rows], behaviour_logprobs=behaviour[rows]),
        lambda i: dict(kwargs, group_ids=GROUPS[i:i + 1], behaviour_logprobs=behaviour[i:i + 1]))
    assert (g_naive - g_whole).abs().max() > 1e-3


def test_grpo_with_group_advantages_computed_before_the_split():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    advantages = group_relative_advantages(rewards, GROUPS, normalize_std=True)

    def args(logits, teacher, mask, behaviour, rows):
        return torch.log_softmax(logits[rows], -1)[..., 0], mask[rows], advantages[rows]

    whole, split, g_whole, g_split = whole_and_split(
        losses.grpo_loss, args, lambda rows: dict(old_logprobs=inputs()[3][rows]),
        lambda i: dict(old_logprobs=inputs()[3][i:i + 1]))
    assert float(split.detach()) == pytest.approx(float(whole.detach()), abs=1e-12)
    assert torch.allclose(g_split, g_whole, atol=1e-9, rtol=0)


def test_sdpo_split_into_single_sequences():
    def args(logits, teacher, mask, behaviour, rows):
        logp = torch.log_softmax(logits[rows], -1)
        return logp[..., 0], logp[..., :K], teacher[rows], mask[rows]

    whole, split, g_whole, g_split = whole_and_split(
        losses.sdpo_loss, args, lambda rows: dict(behaviour_logprobs=inputs()[3][rows]),
        lambda i: dict(behaviour_logprobs=inputs()[3][i:i + 1]))
    assert float(split.detach()) == pytest.approx(float(whole.detach()), abs=1e-12)
    assert torch.allclose(g_split, g_whole, atol=1e-9, rtol=0)
