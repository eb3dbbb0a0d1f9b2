"""Loss values against independent float64 numpy references (plain loops) and hand-computed numbers."""

import math

import numpy as np
import pytest
import torch

from distil_ray.algorithms import ALGORITHMS, get_algorithm
from distil_ray.algorithms.advantages import group_relative_advantages
from distil_ray.algorithms.losses import (
    aggregate,
    distil_loss,
    grpo_loss,
    log1mexp,
    opsd_loss,
    sdpo_loss,
    sft_loss,
)

B, T, K, V = 3, 5, 4, 9


def random_batch(seed=0):
    """Student/teacher full-vocab log-probs; the loss sees them at the teacher's top-K ids."""
    rng = np.random.default_rng(seed)
    s_full = torch.log_softmax(torch.tensor(rng.normal(size=(B, T, V))), -1)
    t_full = torch.log_softmax(torch.tensor(2 * rng.normal(size=(B, T, V))), -1)
    topk_ids = t_full.topk(K, -1).indices
    tokens = torch.tensor(rng.integers(0, V, size=(B, T)))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    behaviour = s_full.gather(-1, tokens[..., None])[..., 0] + torch.tensor(rng.normal(scale=0.8, size=(B, T)))
    return dict(
        token_logprobs=s_full.gather(-1, tokens[..., None])[..., 0],
        student_topk_logprobs=s_full.gather(-1, topk_ids),
        teacher_topk_logprobs=t_full.gather(-1, topk_ids),
        mask=mask,
        behaviour=behaviour,
    )


def loss_args(batch, **overrides):
    """The four positional tensors every teacher-based loss takes, optionally replaced."""
    keys = ("token_logprobs", "student_topk_logprobs", "teacher_topk_logprobs", "mask")
    return [overrides.get(k, batch[k]) for k in keys]


# ---------------------------------------------------------------- numpy references (loops)


def np_dist(logp, norm):
    p = np.exp(logp)
    if norm == "renorm":
        return p / p.sum()
    return np.append(p, 1.0 - p.sum())


def np_kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def np_gjsd(s, t, alpha):
    if alpha == 0:
        return np_kl(t, s)
    if alpha == 1:
        return np_kl(s, t)
    m = (1 - alpha) * s + alpha * t
    return (1 - alpha) * np_kl(s, m) + alpha * np_kl(t, m)


def np_aggregate(x, mask, mode):
    rows = [[x[b][t] for t in range(T) if mask[b][t]] for b in range(B)]
    rows = [r for r in rows if r]
    if mode == "token-mean":
        return sum(map(sum, rows)) / sum(map(len, rows))
    if mode == "seq-sum":
        return sum(map(sum, rows)) / len(rows)
    return sum(sum(r) / len(r) for r in rows) / len(rows)


def np_ratio(batch, b, t, clip):
    r = math.exp(float(batch["token_logprobs"][b, t] - batch["behaviour"][b, t]))
    return min(r, clip) if clip is not None else r


def per_position(batch, norm):
    s = batch["student_topk_logprobs"].numpy()
    t = batch["teacher_topk_logprobs"].numpy()
    return [[(np_dist(s[b, i], norm), np_dist(t[b, i], norm)) for i in range(T)] for b in range(B)]


# ---------------------------------------------------------------- SDPO / OPSD


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("norm", ["renorm", "tail"])
@pytest.mark.parametrize("is_clip", [None, 1.5])
def test_sdpo_matches_reference(alpha, norm, is_clip):
    batch = random_batch(1)
    dists = per_position(batch, norm)
    ref = [
        [np_gjsd(*dists[b][t], alpha) * (np_ratio(batch, b, t, is_clip) if is_clip else 1.0) for t in range(T)]
        for b in range(B)
    ]
    loss, metrics = sdpo_loss(
        *loss_args(batch),
        alpha=alpha,
        topk_norm=norm,
        behaviour_logprobs=batch["behaviour"] if is_clip else None,
        is_clip=is_clip,
    )
    assert float(loss) == pytest.approx(np_aggregate(ref, batch["mask"].tolist(), "token-mean"), rel=1e-12, abs=1e-13)
    if is_clip:
        n_clipped = sum(
            np_ratio(batch, b, t, None) > is_clip for b in range(B) for t in range(T) if batch["mask"][b, t]
        )
        assert metrics["sdpo/clip_frac"] == pytest.approx(n_clipped / int(batch["mask"].sum()))
        assert 0 < n_clipped < int(batch["mask"].sum())  # the example exercises both sides


def test_sdpo_endpoints_are_the_two_kls_by_hand():
    # one position, K=2, renorm: student (0.25, 0.75), teacher (0.5, 0.5)
    s = torch.log(torch.tensor([[[0.25, 0.75]]], dtype=torch.float64))
    t = torch.log(torch.tensor([[[0.5, 0.5]]], dtype=torch.float64))
    args = (s[..., 0], s, t, torch.ones(1, 1))
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    m = [0.375, 0.625]
    jsd = 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    )
    for alpha, expected in ((0.0, forward), (1.0, reverse), (0.5, jsd)):
        loss, _ = sdpo_loss(*args, alpha=alpha, topk_norm="renorm")
        assert float(loss) == pytest.approx(expected, rel=1e-12)
        loss, _ = opsd_loss(*args, beta=alpha)
        assert float(loss) == pytest.approx(expected, rel=1e-12)


def test_tail_bucket_by_hand():
    # full-vocab student (0.1, 0.2 | 0.7 elsewhere), teacher (0.5, 0.3 | 0.2): forward KL with the tail
    s = torch.log(torch.tensor([[[0.1, 0.2]]], dtype=torch.float64))
    t = torch.log(torch.tensor([[[0.5, 0.3]]], dtype=torch.float64))
    loss, _ = sdpo_loss(s[..., 0], s, t, torch.ones(1, 1), alpha=0.0, topk_norm="tail")
    expected = 0.5 * math.log(0.5 / 0.1) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.7)
    assert float(loss) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("token_clip", [None, 0.05])
def test_opsd_matches_reference(beta, token_clip):
    batch = random_batch(2)
    dists = per_position(batch, "renorm")
    ref = [[np_gjsd(*dists[b][t], beta) for t in range(T)] for b in range(B)]
    if token_clip is not None:
        ref = [[min(x, token_clip) for x in row] for row in ref]
    loss, _ = opsd_loss(
        *loss_args(batch),
        beta=beta,
        token_clip=token_clip,
    )
    assert float(loss) == pytest.approx(np_aggregate(ref, batch["mask"].tolist(), "token-mean"), rel=1e-12)


def test_log1mexp_is_accurate_at_both_ends_and_finite_at_zero():
    x = torch.tensor([-1e-12, -1e-5, -0.5, -0.8, -5.0, -50.0], dtype=torch.float64, requires_grad=True)
    expected = [math.log(-math.expm1(v)) if v > -math.log(2) else math.log1p(-math.exp(v)) for v in x.tolist()]
    torch.testing.assert_close(log1mexp(x), torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)
    z = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    assert torch.isfinite(log1mexp(z)).all()
    (g,) = torch.autograd.grad(log1mexp(z).sum(), z)
    assert torch.isfinite(g).all()


# ---------------------------------------------------------------- DistIL values


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("norm", ["renorm", "tail"])
def test_distil_value_matches_reference(loss_agg, norm):
    batch = random_batch(3)
    lam, gamma, clip = 0.7, 0.5, 1.5
    mask = batch["mask"].tolist()
    dists = per_position(batch, norm)
    ce = [[-sum(pt * math.log(ps) for ps, pt in zip(*dists[b][t])) if mask[b][t] else 0.0 for t in range(T)] for b in range(B)]
    logp = batch["token_logprobs"].tolist()
    ref = []
    for b in range(B):
        row = []
        for t in range(T):
            g = sum(gamma ** (i - t - 1) * ce[b][i] for i in range(t + 1, T))
            row.append((ce[b][t] + lam * g * logp[b][t]) * np_ratio(batch, b, t, clip))
        ref.append(row)
    loss, metrics = distil_loss(
        *loss_args(batch),
        future_credit_coef=lam,
        gamma=gamma,
        topk_norm=norm,
        loss_agg=loss_agg,
        behaviour_logprobs=batch["behaviour"],
        is_clip=clip,
    )
    assert float(loss) == pytest.approx(np_aggregate(ref, mask, loss_agg), rel=1e-12)
    assert metrics["distil/ce"] == pytest.approx(np_aggregate(ce, mask, "token-mean"), rel=1e-12)
    assert metrics["distil/kl"] <= metrics["distil/ce"]


def test_sdpo_as_run_counts_the_samples_without_signal_by_hand():
    """SDPO as it runs: one sequence per micro-batch, each a token mean, the sum scaled by 1/N over
    all N samples — a sample the teacher had no signal for is a 0 in the mean, not left out."""
    x = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 8.0, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])  # row 3: no teacher signal
    as_run = ((1 + 2 + 3) / 3 + (4 + 8) / 2 + 0.0) / 3
    assert float(aggregate(x, mask, "seq-mean-token-mean-all")) == pytest.approx(as_run, rel=1e-15)
    assert float(aggregate(x, mask, "seq-mean-token-mean")) == pytest.approx(as_run * 3 / 2, rel=1e-15)
    # the learner's global count of samples (micro-batches of one batch share it)
    assert float(aggregate(x[:1], mask[:1], "seq-mean-token-mean-all", denominator=3)) == pytest.approx(2 / 3)
    # on the SDPO loss, with its IS ratio, against the float64 reference of each position
    batch = random_batch(5)
    batch["mask"][1] = 0  # a sample without signal
    dists = per_position(batch, "tail")
    ref = [[np_gjsd(*dists[b][t], 0.5) * np_ratio(batch, b, t, 2.0) for t in range(T)] for b in range(B)]
    rows = [[ref[b][t] for t in range(T) if batch["mask"][b, t]] for b in range(B)]
    expected = sum(sum(r) / len(r) for r in rows if r) / B
    loss, _ = sdpo_loss(*loss_args(batch), alpha=0.5, topk_norm="tail", loss_agg="seq-mean-token-mean-all",
                        behaviour_logprobs=batch["behaviour"], is_clip=2.0)
    assert float(loss) == pytest.approx(expected, rel=1e-12)


def test_seq_sum_of_one_sequence_is_its_sum():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert float(aggregate(x, mask, "seq-sum")) == 6.0
    assert float(aggregate(x, mask, "token-mean")) == 2.0
    # a shared global denominator (micro-batches of one batch)
    assert float(aggregate(x, mask, "token-mean", denominator=6)) == 1.0


# ---------------------------------------------------------------- GRPO / SFT


def test_grpo_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.2]], dtype=torch.float64))
    old = torch.log(torch.tensor([[0.4, 0.4]], dtype=torch.float64))  # ratios 1.25, 0.5
    mask = torch.ones(1, 2)
    # A=+1: max(-1.25, -min(1.25,1.28)) = -1.25 ; max(-0.5, -0.8) = -0.5  → mean -0.875
    loss, m = grpo_loss(logp, mask, torch.tensor([1.0]), old_logprobs=old, clip_eps_low=0.2, clip_eps_high=0.28)
    assert float(loss) == pytest.approx(-0.875)
    assert m["grpo/clip_frac"] == 0.0  # the clipped branch is never the active one
    # A=-1: max(1.25, 1.25) = 1.25 ; max(0.5, 0.8) = 0.8 (clipped branch active) → mean 1.025
    loss, m = grpo_loss(logp, mask, torch.tensor([-1.0]), old_logprobs=old, clip_eps_low=0.2, clip_eps_high=0.28)
    assert float(loss) == pytest.approx(1.025)
    assert m["grpo/clip_frac"] == pytest.approx(0.5)
    # clip-higher: with ε_high=0.1 the A=+1 first token is clipped at 1.1
    loss, _ = grpo_loss(logp, mask, torch.tensor([1.0]), old_logprobs=old, clip_eps_low=0.2, clip_eps_high=0.1)
    assert float(loss) == pytest.approx((-1.1 - 0.5) / 2)


def test_grpo_on_policy_gradient_is_the_policy_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([2.0], dtype=torch.float64)
    loss, _ = grpo_loss(logp, torch.ones(1, 3), adv)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, torch.full((1, 3), -2.0 / 3, dtype=torch.float64))


def test_group_relative_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0, 7, 7, 3])
    adv = group_relative_advantages(rewards, groups)
    torch.testing.assert_close(adv, torch.tensor([0.25, -0.75, 0.25, 0.25, 0.0, 0.0, 0.0], dtype=torch.float64))
    adv = group_relative_advantages(rewards, groups, normalize_std=True)  # group-0 unbiased std = 0.5
    torch.testing.assert_close(adv, torch.tensor([0.5, -1.5, 0.5, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_sft_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.5, 0.5, 0.5]], dtype=torch.float64))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, _ = sft_loss(logp, mask)
    assert float(loss) == pytest.approx((math.log(2) + math.log(4) + math.log(2)) / 3)
    loss, _ = sft_loss(logp, mask, loss_agg="seq-mean-token-mean")
    assert float(loss) == pytest.approx(((math.log(2) + math.log(4)) / 2 + math.log(2)) / 2)


# ---------------------------------------------------------------- guard rails


@pytest.mark.parametrize(
    "kwargs, key",
    [({"topk_norm": "softmax"}, "topk_norm"), ({"loss_agg": "mean"}, "loss_agg"), ({"baseline": "ema"}, "baseline")],
)
def test_bad_option_names_the_key_and_allowed_values(kwargs, key):
    batch = random_batch(0)
    with pytest.raises(ValueError, match=rf"{key}=.*allowed values"):
        distil_loss(*loss_args(batch), **kwargs)


def test_registry():
    assert set(ALGORITHMS) == {"distil", "ce", "sdpo", "opsd", "grpo", "sft"}
    assert get_algorithm("distil").needs_teacher and get_algorithm("grpo").needs_advantages
    with pytest.raises(ValueError, match="allowed values"):
        get_algorithm("ppo")


def test_padding_garbage_does_not_leak():
    batch = random_batch(4)
    teacher = batch["teacher_topk_logprobs"].clone()
    teacher[~batch["mask"].bool()] = float("nan")
    student = batch["student_topk_logprobs"].clone().requires_grad_()
    for loss_fn in (distil_loss, sdpo_loss, opsd_loss):
        loss, _ = loss_fn(batch["token_logprobs"], student, teacher, batch["mask"])
        clean, _ = loss_fn(batch["token_logprobs"], student, batch["teacher_topk_logprobs"], batch["mask"])
        assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(float(clean.detach()), rel=1e-12)
        (g,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(g).all()


# ---------------------------------------------------------------- stop-gradients and numerics


def test_teacher_is_a_stop_gradient_target():
    batch = random_batch(5)
    teacher = batch["teacher_topk_logprobs"].clone().requires_grad_()
    student = batch["student_topk_logprobs"].clone().requires_grad_()
    for loss_fn in (distil_loss, sdpo_loss, opsd_loss):
        loss, _ = loss_fn(batch["token_logprobs"], student, teacher, batch["mask"])
        g_teacher, g_student = torch.autograd.grad(loss, [teacher, student], allow_unused=True)
        assert g_teacher is None or not g_teacher.any(), loss_fn.__name__
        assert g_student.abs().max() > 0


@pytest.mark.parametrize("loss_fn", [distil_loss, sdpo_loss])
def test_importance_ratio_scales_each_token_gradient_and_is_not_differentiated(loss_fn):
    """With one token per sequence, ∇ loss_IS = ratio · ∇ loss (ratio detached and clipped)."""
    batch = random_batch(6)
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[:, 2] = 1
    tok = batch["token_logprobs"].clone().requires_grad_()
    student = batch["student_topk_logprobs"].clone().requires_grad_()
    kwargs = dict(loss_agg="seq-sum") if loss_fn is distil_loss else {}
    plain, _ = loss_fn(tok, student, batch["teacher_topk_logprobs"], mask, **kwargs)
    weighted, _ = loss_fn(tok, student, batch["teacher_topk_logprobs"], mask, behaviour_logprobs=batch["behaviour"], is_clip=1.5, **kwargs)
    g_plain = torch.autograd.grad(plain, [tok, student], allow_unused=True)
    g_weighted = torch.autograd.grad(weighted, [tok, student], allow_unused=True)
    ratio = (batch["token_logprobs"] - batch["behaviour"]).exp().clamp(max=1.5)[:, 2]
    for gp, gw in zip(g_plain, g_weighted):
        if gp is None:
            assert gw is None or not gw.any()
            continue
        scale = ratio.view(B, *([1] * (gp.dim() - 1)))
        torch.testing.assert_close(gw, gp * scale, rtol=1e-12, atol=1e-15)


def test_underflowing_student_probability_keeps_gradients_finite():
    # float32 log-prob −150: its probability is exactly 0 in float32
    student = torch.tensor([[[-0.01, -5.0, -150.0]]], dtype=torch.float32, requires_grad=True)
    teacher = torch.log(torch.tensor([[[0.5, 0.3, 0.1]]], dtype=torch.float32))
    for loss_fn, kw in ((sdpo_loss, {"alpha": 0.5}), (sdpo_loss, {"alpha": 1.0}), (sdpo_loss, {"alpha": 1.0, "topk_norm": "renorm"}), (opsd_loss, {"beta": 0.5}), (distil_loss, {})):
        loss, _ = loss_fn(student[..., 0], student, teacher, torch.ones(1, 1), **kw)
        (g,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), (loss_fn.__name__, kw)


def test_garbage_in_every_input_at_masked_positions_keeps_gradients_finite():
    batch = random_batch(7)
    off = ~batch["mask"].bool()
    tok = batch["token_logprobs"].clone()
    tok[off] = float("nan")
    student = batch["student_topk_logprobs"].clone()
    student[off] = float("-inf")
    behaviour = batch["behaviour"].clone()
    behaviour[off] = float("nan")
    tok.requires_grad_()
    student.requires_grad_()
    for loss_fn in (distil_loss, sdpo_loss):
        loss, _ = loss_fn(tok, student, batch["teacher_topk_logprobs"], batch["mask"], behaviour_logprobs=behaviour)
        grads = torch.autograd.grad(loss, [tok, student], allow_unused=True)
        assert torch.isfinite(loss) and all(g is None or torch.isfinite(g).all() for g in grads), loss_fn.__name__


def test_half_precision_inputs_are_computed_in_float32():
    batch = random_batch(8)
    args = [batch[k].to(torch.bfloat16) for k in ("token_logprobs", "student_topk_logprobs", "teacher_topk_logprobs")]
    loss, _ = sdpo_loss(*args, batch["mask"], topk_norm="tail")
    ref, _ = sdpo_loss(*[a.double() for a in args], batch["mask"], topk_norm="tail")
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)


def test_grpo_dual_clip_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    old = torch.log(torch.tensor([[0.1, 0.4]], dtype=torch.float64))  # ratios 5, 1.25
    # A=-1: token 1 max(5, 1.28) = 5 → dual clip at c=3 → 3; token 2 max(1.25, 1.25) = 1.25
    loss, _ = grpo_loss(logp, torch.ones(1, 2), torch.tensor([-1.0]), old_logprobs=old, clip_ratio_c=3.0)
    assert float(loss) == pytest.approx((3.0 + 1.25) / 2)
    # positive advantages are untouched by the dual clip
    a, _ = grpo_loss(logp, torch.ones(1, 2), torch.tensor([1.0]), old_logprobs=old, clip_ratio_c=3.0)
    b, _ = grpo_loss(logp, torch.ones(1, 2), torch.tensor([1.0]), old_logprobs=old)
    assert float(a) == float(b)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        grpo_loss(logp, torch.ones(1, 2), torch.tensor([1.0]), clip_ratio_c=0.5)


def test_group_advantages_accept_integer_and_bool_rewards():
    groups = torch.tensor([0, 0, 1, 1])
    for rewards in (torch.tensor([1, 0, 1, 1]), torch.tensor([True, False, True, True])):
        adv = group_relative_advantages(rewards, groups, normalize_std=True)
        assert adv.dtype == torch.float64
        torch.testing.assert_close(adv, torch.tensor([0.7071, -0.7071, 0.0, 0.0], dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("loss", ["sdpo", "distil"])
def test_two_factor_is_correction_by_hand(loss):
    """SDPO's off-policy weight: clamp(π_θ/π_old, c1) · clamp(π_old/μ, c2), each factor truncated
    on its own; without π_old (the batch's first update, π_old = π_θ) it is clamp(π_θ/μ, c2)."""
    batch = random_batch(7)
    rng = np.random.default_rng(3)
    old = batch["token_logprobs"] + torch.tensor(rng.normal(scale=0.8, size=(B, T)))
    mask = batch["mask"].tolist()
    dists = per_position(batch, "tail")
    if loss == "sdpo":
        local = [[np_gjsd(*dists[b][t], 0.5) for t in range(T)] for b in range(B)]
        fn, kw = sdpo_loss, dict(alpha=0.5, topk_norm="tail")
    else:  # CE only: the weight multiplies the whole per-token term either way
        local = [[-sum(pt * math.log(ps) for ps, pt in zip(*dists[b][t])) for t in range(T)] for b in range(B)]
        fn, kw = distil_loss, dict(future_credit_coef=0.0, topk_norm="tail")
    theta, mu, o = (x.tolist() for x in (batch["token_logprobs"], batch["behaviour"], old))
    ref = [[local[b][t] * min(math.exp(theta[b][t] - o[b][t]), 1.5) * min(math.exp(o[b][t] - mu[b][t]), 2.0)
            for t in range(T)] for b in range(B)]
    got, metrics = fn(*loss_args(batch), **kw, behaviour_logprobs=batch["behaviour"], is_clip=1.5,
                      is_mode="two_factor", rollout_is_clip=2.0, old_logprobs=old)
    assert float(got) == pytest.approx(np_aggregate(ref, mask, "token-mean"), rel=1e-12)
    first, _ = fn(*loss_args(batch), **kw, behaviour_logprobs=batch["behaviour"], is_clip=1.5,
                  is_mode="two_factor", rollout_is_clip=2.0)
    single, _ = fn(*loss_args(batch), **kw, behaviour_logprobs=batch["behaviour"], is_clip=2.0)
    assert float(first) == pytest.approx(float(single), rel=1e-12)
    with pytest.raises(ValueError, match="is_mode"):
        fn(*loss_args(batch), **kw, behaviour_logprobs=batch["behaviour"], is_mode="three")
