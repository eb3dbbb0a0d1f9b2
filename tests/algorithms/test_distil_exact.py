"""DistIL's surrogate gives the exact gradient of E_y Σ_t CE_t — proven by enumeration.

Tabular student (vocab 3, horizon 3, every prefix its own logits: 27 sequences), a fixed random
teacher table, float64. ``∇ Σ_y π_θ(y) Σ_t CE_t`` (autograd through the enumeration) must equal
``Σ_y π_θ(y) ∇ surrogate(y)``. A sign error, a wrong coefficient, or a missing future-credit term
breaks the equality. Credit flowing backwards in time (G_t including CE_t or earlier terms) does
not: those terms do not depend on y_t, so they have zero mean and only add variance — that is
what ``test_future_returns_only_look_forward`` pins down directly.
"""

import itertools

import pytest
import torch

from distil_ray.algorithms.advantages import future_returns, group_loo_baseline
from distil_ray.algorithms.losses import ce_loss, distil_loss
from tests.algorithms.tabular import TabularPolicy


def expected_surrogate_grad(policy, loss_fn, **kwargs):
    total = torch.zeros_like(policy.theta)
    for y in policy.sequences():
        loss, _ = loss_fn(*policy.loss_inputs(y), loss_agg="seq-sum", **kwargs)
        weight = policy.seq_logprob(y).exp().detach()
        total += weight * policy.grad(loss)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distil_surrogate_gradient_is_exact(seed):
    policy = TabularPolicy(vocab=3, horizon=3, seed=seed)
    exact = policy.grad(policy.exact_objective())
    estimate = expected_surrogate_grad(policy, distil_loss, future_credit_coef=1.0, gamma=1.0, baseline="none")
    assert exact.abs().max() > 1e-2  # the example is not degenerate
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-9)


def test_tail_bucket_with_full_vocab_is_also_exact():
    # K = V: the tail bucket holds (numerically) nothing and must not change the gradient.
    policy = TabularPolicy(vocab=3, horizon=3, seed=3)
    exact = policy.grad(policy.exact_objective())
    estimate = expected_surrogate_grad(policy, distil_loss, topk_norm="tail")
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-9)


def test_ce_ablation_misses_the_future_credit():
    policy = TabularPolicy(vocab=3, horizon=3, seed=0)
    exact = policy.grad(policy.exact_objective())
    local_only = expected_surrogate_grad(policy, ce_loss)
    gap = (local_only - exact).norm() / exact.norm()
    assert gap > 0.05, f"CE ablation should differ measurably from the exact gradient (relative gap {gap:.3g})"
    # ... and the difference is precisely the future-credit term's expectation
    credit_only = expected_surrogate_grad(policy, distil_loss) - local_only
    torch.testing.assert_close(local_only + credit_only, exact, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sign", [-1.0, 0.5, 2.0])
def test_wrong_future_credit_coefficient_is_not_exact(sign):
    policy = TabularPolicy(vocab=3, horizon=3, seed=1)
    exact = policy.grad(policy.exact_objective())
    estimate = expected_surrogate_grad(policy, distil_loss, future_credit_coef=sign)
    assert (estimate - exact).abs().max() > 1e-3


def test_future_returns_only_look_forward():
    ce = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    g1 = future_returns(ce, mask, gamma=1.0)
    torch.testing.assert_close(g1, torch.tensor([[14.0, 12.0, 8.0, 0.0, 0.0]], dtype=torch.float64))
    g_half = future_returns(ce, mask, gamma=0.5)
    # G_0 = 2 + .5·4 + .25·8 = 6; G_1 = 4 + .5·8 = 8; G_2 = 8; G_3 = 0 (CE_4 is padding)
    torch.testing.assert_close(g_half, torch.tensor([[6.0, 8.0, 8.0, 0.0, 0.0]], dtype=torch.float64))


def _pair_estimates(policy, baseline, eos=None, pad="right"):
    """Every pair (y1, y2) of rollouts of one prompt: its probability and the gradient estimate."""
    seqs = policy.sequences(eos)
    inputs = [policy.loss_inputs(y, pad) for y in seqs]
    probs = torch.stack([policy.seq_logprob(y).exp().detach() for y in seqs])
    weights, grads = [], []
    for i, j in itertools.product(range(len(seqs)), repeat=2):
        a, b = inputs[i], inputs[j]
        batch = [torch.cat([x, z]) for x, z in zip(a, b)]
        loss, _ = distil_loss(*batch, loss_agg="seq-sum", baseline=baseline, group_ids=torch.tensor([0, 0]))
        weights.append(probs[i] * probs[j])
        grads.append(policy.grad(loss, retain_graph=True).flatten())
    return torch.stack(weights), torch.stack(grads)


def test_group_baseline_keeps_expectation_and_reduces_variance():
    """Two rollouts per prompt, all 27² pairs enumerated. The leave-one-out group baseline gives
    the exact expected gradient (unbiased) and a smaller total variance than no baseline."""
    policy = TabularPolicy(vocab=3, horizon=3, seed=4)
    exact = policy.grad(policy.exact_objective()).flatten()
    stats = {}
    for baseline in ("none", "group"):
        w, g = _pair_estimates(policy, baseline)
        mean = (w[:, None] * g).sum(0)
        torch.testing.assert_close(mean, exact, rtol=0, atol=1e-9)
        stats[baseline] = float((w * ((g - mean) ** 2).sum(-1)).sum())
    print(f"total gradient variance: none={stats['none']:.4f} group={stats['group']:.4f}")
    assert stats["group"] < 0.8 * stats["none"]


@pytest.mark.parametrize("pad", ["right", "left"])
@pytest.mark.parametrize("baseline", ["none", "group"])
def test_variable_lengths_and_either_padding_stay_exact(pad, baseline):
    """Responses end at their first EOS (lengths 1–3) and are padded left or right in the batch:
    the expected gradient over all pairs of rollouts is still exactly ∇L."""
    policy = TabularPolicy(vocab=3, horizon=3, seed=6)
    eos = 2
    total = sum(policy.seq_logprob(y).exp() for y in policy.sequences(eos))
    assert float(total.detach()) == pytest.approx(1.0, abs=1e-12)
    exact = policy.grad(policy.exact_objective(eos)).flatten()
    w, g = _pair_estimates(policy, baseline, eos, pad)
    torch.testing.assert_close((w[:, None] * g).sum(0), exact, rtol=0, atol=1e-9)


def test_group_baseline_is_leave_one_out_and_per_position():
    values = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 0.0], [5.0, 6.0, 7.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    groups = torch.tensor([0, 0, 0, 1])
    b = group_loo_baseline(values, mask, groups)
    expected = torch.tensor(
        [
            [4.0, 5.0, 7.0],  # others: rows 1, 2 (row 1 has no token at t=2)
            [3.0, 4.0, 0.0],  # others: rows 0, 2 (t=2 is not one of its response tokens)
            [2.0, 3.0, 3.0],  # others: rows 0, 1
            [0.0, 0.0, 0.0],  # alone in its group
        ]
    )
    torch.testing.assert_close(b, expected)
    # positions count within each response: left-padding a row does not change its baseline
    shifted_values = torch.tensor([[1.0, 2.0, 3.0], [0.0, 3.0, 4.0], [5.0, 6.0, 7.0], [9.0, 9.0, 9.0]])
    shifted_mask = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])
    b = group_loo_baseline(shifted_values, shifted_mask, groups)
    torch.testing.assert_close(b[[0, 2, 3]], expected[[0, 2, 3]])
    torch.testing.assert_close(b[1], torch.tensor([0.0, 3.0, 4.0]))
