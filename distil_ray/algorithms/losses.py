"""The losses of DistIL and its baselines: pure tensor functions returning ``(loss, metrics)``.

No Ray, no model: a loss sees log-probabilities only. Shared conventions:

* ``token_logprobs``        ``[B,T]``   log π_θ(y_t|s_t) of the sampled tokens (differentiable)
* ``student_topk_logprobs`` ``[B,T,K]`` log π_θ(v|s_t) at the teacher's top-K ids (differentiable)
* ``teacher_topk_logprobs`` ``[B,T,K]`` teacher log-probs at those ids, normalised over the full
  vocabulary (so their exp sums to ≤ 1; the remainder is the tail mass)
* ``mask``                  ``[B,T]``   1 on response tokens that carry a loss
* ``behaviour_logprobs``    ``[B,T]``   log-probs of the policy that sampled y (stale samples)

``metrics`` is a dict of Python floats.
"""

from __future__ import annotations

import math

import torch

from distil_ray.algorithms.advantages import BASELINES, credit_baseline, future_returns

IS_MODES = ("single", "two_factor")
LOSS_AGG_MODES = ("token-mean", "seq-sum", "seq-mean-token-mean", "seq-mean-token-mean-all")
TOPK_NORMS = ("renorm", "tail")
_LOG_RATIO_CLAMP = 20.0  # keeps exp(log-ratio) finite for wildly stale samples


def _check_choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}: allowed values are {tuple(allowed)}")


# --------------------------------------------------------------------------- building blocks


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, denominator=None) -> torch.Tensor:
    """Reduce a ``[B,T]`` per-token loss to a scalar.

    * ``token-mean``: Σ over all response tokens / number of response tokens
    * ``seq-sum``: Σ over each sequence's tokens, mean over sequences (one sequence: its sum)
    * ``seq-mean-token-mean``: per-sequence token mean, then mean over sequences
    * ``seq-mean-token-mean-all``: the same, but every row counts, those without a loss token (a
      sample the teacher had no signal for) as 0 — SDPO's loss as it runs (one sequence per
      micro-batch, each a token mean, scaled by 1/number of sequences)

    Otherwise sequences with no loss token do not count. ``denominator`` overrides the count
    (tokens or sequences) so that micro-batches of one global batch can share it.
    """
    _check_choice("loss_agg", mode, LOSS_AGG_MODES)
    m = mask.bool()
    # where, not multiply: padded positions may hold inf/nan that must not leak into the sum.
    x = torch.where(m, per_token, torch.zeros_like(per_token))
    if mode == "token-mean":
        count = m.sum() if denominator is None else denominator
        return x.sum() / torch.as_tensor(count, dtype=x.dtype).clamp(min=1)
    tokens_per_seq = m.sum(-1)
    if denominator is not None:
        n_seq = denominator
    else:
        n_seq = m.shape[0] if mode == "seq-mean-token-mean-all" else (tokens_per_seq > 0).sum()
    n_seq = torch.as_tensor(n_seq, dtype=x.dtype).clamp(min=1)
    if mode == "seq-sum":
        return x.sum() / n_seq
    return (x.sum(-1) / tokens_per_seq.clamp(min=1).to(x.dtype)).sum() / n_seq


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, accurate everywhere (Mächler, 2012).

    ``x`` is clamped just below 0 (by one machine epsilon): a top-K mass that rounds to ≥ 1 (K = V)
    leaves a tail of ~eps instead of log(0) = −inf, whose gradient would be NaN.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    near_zero = x > -math.log(2.0)
    # each branch only ever sees inputs where it is finite, so gradients stay finite too
    a = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, a, b)


def masked_inputs(mask: torch.Tensor, *tensors):
    """Each tensor with the positions outside ``mask`` replaced by 0, in float32 at least.

    Padding (and samples switched off by the distillation mask) may hold inf/NaN; masking the
    *loss* is not enough, because a NaN input poisons the gradient even where the loss is 0.
    Half-precision inputs are upcast: the tail bucket and the divergences need float32's range.
    """
    keep = mask.bool()
    out = []
    for x in tensors:
        if x is None:
            out.append(None)
            continue
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        k = keep if x.dim() == keep.dim() else keep[..., None]
        out.append(torch.where(k, x, torch.zeros((), dtype=x.dtype, device=x.device)))
    return out


def topk_log_distributions(student_topk_logprobs, teacher_topk_logprobs, topk_norm: str):
    """Turn top-K log-probs into two proper distributions over the same support.

    ``renorm``: renormalise both over the K ids. ``tail``: keep the full-vocabulary values and
    append a (K+1)-th bucket holding the rest of the mass, ``log(1 − Σ_k p_k)``.
    The teacher side is always detached (the teacher is a stop-gradient target).
    """
    _check_choice("topk_norm", topk_norm, TOPK_NORMS)
    teacher = teacher_topk_logprobs.detach()
    if topk_norm == "renorm":
        return (
            student_topk_logprobs - torch.logsumexp(student_topk_logprobs, -1, keepdim=True),
            teacher - torch.logsumexp(teacher, -1, keepdim=True),
        )

    def with_tail(logp):
        return torch.cat([logp, log1mexp(torch.logsumexp(logp, -1, keepdim=True))], dim=-1)

    return with_tail(student_topk_logprobs), with_tail(teacher)


def cross_entropy(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """``H×(p_T, p_S) = −Σ_v p_T(v) log p_S(v)`` over the last dim."""
    return -(teacher_logp.exp() * student_logp).sum(-1)


def kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """``KL(p‖q) = Σ p (log p − log q)`` over the last dim, from log-probabilities.

    Written on the log-probs (as ``F.kl_div(log_target=True)``), not as ``xlogy(p, p)``: a
    probability that underflows to 0 then contributes 0 to the value *and* a finite gradient.
    """
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """Generalised Jensen–Shannon divergence per position.

    ``α=0``: forward KL(T‖S); ``α=1``: reverse KL(S‖T); otherwise, with the mixture
    ``M = (1−α)·S + α·T``, ``(1−α)·KL(S‖M) + α·KL(T‖M)`` (α = 0.5 is the usual JSD).
    The endpoints are handled apart because the mixture formula degenerates to 0 there.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r}: must lie in [0, 1]")
    if alpha == 0.0:
        return kl(teacher_logp, student_logp)
    if alpha == 1.0:
        return kl(student_logp, teacher_logp)
    mixture = torch.logsumexp(
        torch.stack([student_logp + math.log1p(-alpha), teacher_logp + math.log(alpha)]), dim=0
    )
    return (1.0 - alpha) * kl(student_logp, mixture) + alpha * kl(teacher_logp, mixture)


def importance_ratio(token_logprobs, behaviour_logprobs, is_clip):
    """Per-token ratio π_θ/μ (detached), truncated at ``is_clip`` (None: not truncated)."""
    log_ratio = (token_logprobs.detach() - behaviour_logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    clipped = torch.zeros_like(ratio, dtype=torch.bool)
    if is_clip is not None:
        clipped = ratio > is_clip
        ratio = ratio.clamp(max=is_clip)
    return ratio, clipped


def off_policy_weights(token_logprobs, behaviour_logprobs, old_logprobs, is_mode, is_clip, rollout_is_clip):
    """The per-token importance weight (detached) of a sample drawn from μ (the rollout engine).

    ``single``: ``clamp(π_θ/μ, is_clip)``. ``two_factor`` (SDPO's): ``clamp(π_θ/π_old, is_clip) ·
    clamp(π_old/μ, rollout_is_clip)``, with π_old the policy at the start of the batch's updates;
    ``old_logprobs=None`` is the batch's first update, where π_old is π_θ itself.
    """
    _check_choice("is_mode", is_mode, IS_MODES)
    if is_mode == "single":
        return importance_ratio(token_logprobs, behaviour_logprobs, is_clip)
    old = token_logprobs.detach() if old_logprobs is None else old_logprobs
    to_old, clipped_old = importance_ratio(token_logprobs, old, is_clip)
    to_rollout, clipped_rollout = importance_ratio(old, behaviour_logprobs, rollout_is_clip)
    return to_old * to_rollout, clipped_old | clipped_rollout


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool()
    if not m.any():
        return 0.0
    return float(x.detach()[m].double().mean())


def _common_metrics(prefix: str, mask, entropy=None, clipped=None) -> dict:
    out = {f"{prefix}/num_tokens": float(mask.bool().sum())}
    if entropy is not None:
        out[f"{prefix}/entropy"] = _masked_mean(entropy, mask)
    if clipped is not None:
        out[f"{prefix}/clip_frac"] = _masked_mean(clipped.to(torch.float64), mask)
    return out


# --------------------------------------------------------------------------- DistIL and CE


def distil_returns(student_topk_logprobs, teacher_topk_logprobs, mask, *, gamma: float = 1.0,
                   topk_norm: str = "renorm") -> torch.Tensor:
    """The future-credit returns ``G_t = Σ_{i>t} γ^{i−t−1} CE_i`` (no gradient) that
    :func:`distil_loss` computes: what a learner needs of every sibling to give a group that is
    split across micro-batches its exact leave-one-out baseline."""
    student, teacher = masked_inputs(mask, student_topk_logprobs, teacher_topk_logprobs)
    student_logp, teacher_logp = topk_log_distributions(student.detach(), teacher, topk_norm)
    return future_returns(cross_entropy(teacher_logp, student_logp), mask, gamma)


def distil_loss(
    token_logprobs: torch.Tensor,
    student_topk_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    future_credit_coef: float = 1.0,
    gamma: float = 1.0,
    baseline: str = "none",
    topk_norm: str = "renorm",
    loss_agg: str = "token-mean",
    group_ids=None,
    behaviour_logprobs: torch.Tensor | None = None,
    is_clip: float | None = 2.0,
    is_mode: str = "single",
    rollout_is_clip: float | None = 2.0,
    old_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    denominator=None,
    credit_baseline_values: torch.Tensor | None = None,
):
    """DistIL: forward cross-entropy from the teacher to the student along the student's own
    rollout, plus the future-credit term.

    Per token: ``CE_t + λ · sg(G_t − b_t) · log π_θ(y_t|s_t)`` with
    ``G_t = Σ_{i>t} γ^{i−t−1} CE_i`` (detached). With λ=1, γ=1, b=0 its gradient, in expectation
    over y ~ π_θ, is exactly ``∇_θ E_y Σ_t CE_t``: the local term is the dense distillation
    gradient, the future-credit term charges an early token with the disagreement it caused later.
    ``baseline='group'`` subtracts the leave-one-out mean over the prompt's other rollouts
    (unbiased: see ``group_loo_baseline``); it needs all rollouts of a prompt in the same call, or
    ``credit_baseline_values``: the baseline ``[B, T]`` computed beforehand over the whole group
    (``group_loo_baseline`` of every sibling's :func:`distil_returns`), which lets a learner split a
    group across micro-batches without changing the loss.

    What "exact" assumes: the teacher at ``s_t`` is treated as fixed — as in DAgger, where the
    expert relabels the states the learner visited. When the feedback is computed from the whole
    response (an execution trace, a grader message), the teacher's context depends on later tokens
    too, and the estimator ignores that dependence by design. Exactness also needs a fixed
    normaliser: ``seq-sum`` or a constant ``denominator``; ``token-mean`` divides by a token count
    that depends on the samples (a per-batch rescaling — the direction within a batch is kept).

    ``behaviour_logprobs`` (stale samples) multiplies every token's loss by the per-token ratio
    π_θ/μ truncated at ``is_clip`` — the usual truncated, per-token correction, not the full
    product of ratios an exact off-policy future-credit estimate would need; ``is_mode=two_factor``
    splits it as SDPO does (:func:`off_policy_weights`).
    """
    _check_choice("baseline", baseline, BASELINES)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma={gamma!r}: must lie in [0, 1]")
    token_logprobs, student_topk_logprobs, teacher_topk_logprobs, behaviour_logprobs, old_logprobs = masked_inputs(
        mask, token_logprobs, student_topk_logprobs, teacher_topk_logprobs, behaviour_logprobs, old_logprobs
    )
    student_logp, teacher_logp = topk_log_distributions(student_topk_logprobs, teacher_topk_logprobs, topk_norm)
    ce = cross_entropy(teacher_logp, student_logp)
    per_token = ce
    metrics = {}
    if future_credit_coef != 0.0:
        returns = future_returns(ce.detach(), mask, gamma)
        if baseline == "group" and credit_baseline_values is not None:
            b = torch.where(mask.bool(), credit_baseline_values.to(returns.dtype), torch.zeros_like(returns))
        else:
            b = credit_baseline(returns, mask, baseline, group_ids)
        credit = returns - b
        per_token = per_token + future_credit_coef * credit * token_logprobs
        metrics["distil/future_credit_abs"] = _masked_mean(credit.abs(), mask)
        metrics["distil/future_return"] = _masked_mean(returns, mask)
        if baseline == "group":
            # tokens with no same-group sibling that long (e.g. a group split across micro-batches) get b = 0
            metrics["distil/baseline_coverage"] = _masked_mean((b != 0).to(torch.float64), mask)
    clipped = None
    if behaviour_logprobs is not None:
        ratio, clipped = off_policy_weights(token_logprobs, behaviour_logprobs, old_logprobs, is_mode, is_clip,
                                            rollout_is_clip)
        per_token = per_token * ratio
    loss = aggregate(per_token, mask, loss_agg, denominator)
    metrics["distil/ce"] = _masked_mean(ce, mask)
    metrics["distil/kl"] = _masked_mean(kl(teacher_logp, student_logp), mask)
    # how much of the teacher's mass the top-K keeps (what renormalisation rescales)
    metrics["distil/teacher_topk_mass"] = _masked_mean(teacher_topk_logprobs.exp().sum(-1), mask)
    metrics.update(_common_metrics("distil", mask, entropy, clipped))
    return loss, metrics


def ce_loss(token_logprobs, student_topk_logprobs, teacher_topk_logprobs, mask, **kwargs):
    """The local-only ablation: DistIL's forward CE without the future-credit term."""
    kwargs["future_credit_coef"] = 0.0
    return distil_loss(token_logprobs, student_topk_logprobs, teacher_topk_logprobs, mask, **kwargs)


# --------------------------------------------------------------------------- SDPO and OPSD


def sdpo_loss(
    token_logprobs: torch.Tensor,
    student_topk_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: float = 0.5,
    topk_norm: str = "tail",
    loss_agg: str = "token-mean",
    behaviour_logprobs: torch.Tensor | None = None,
    is_clip: float | None = 2.0,
    is_mode: str = "single",
    rollout_is_clip: float | None = 2.0,
    old_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    denominator=None,
):
    """SDPO self-distillation: generalised JSD(α) between student and feedback-conditioned teacher
    over the teacher's top-K (+ tail bucket, or renormalised), per token; each token's divergence
    is multiplied by the IS ratio ``exp(logπ_θ − logπ_old)`` truncated at ``is_clip`` when
    behaviour log-probs are given (``is_mode=two_factor``: SDPO's two truncated factors through
    π_old, :func:`off_policy_weights`); token-mean by default.

    The support is whatever ids the log-probs were gathered at: the reference implementation
    uses the *student's* top-k (teacher scored at those ids), this project's default pipeline the
    teacher's top-k; the divergence itself is the same function.
    """
    token_logprobs, student_topk_logprobs, teacher_topk_logprobs, behaviour_logprobs, old_logprobs = masked_inputs(
        mask, token_logprobs, student_topk_logprobs, teacher_topk_logprobs, behaviour_logprobs, old_logprobs
    )
    student_logp, teacher_logp = topk_log_distributions(student_topk_logprobs, teacher_topk_logprobs, topk_norm)
    divergence = generalized_jsd(student_logp, teacher_logp, alpha)
    per_token, clipped = divergence, None
    if behaviour_logprobs is not None:
        ratio, clipped = off_policy_weights(token_logprobs, behaviour_logprobs, old_logprobs, is_mode, is_clip,
                                            rollout_is_clip)
        per_token = divergence * ratio
    loss = aggregate(per_token, mask, loss_agg, denominator)
    metrics = {"sdpo/divergence": _masked_mean(divergence, mask)}
    metrics.update(_common_metrics("sdpo", mask, entropy, clipped))
    return loss, metrics


def opsd_loss(
    token_logprobs: torch.Tensor,
    student_topk_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.5,
    token_clip: float | None = None,
    loss_agg: str = "token-mean",
    entropy: torch.Tensor | None = None,
    denominator=None,
):
    """OPSD: generalised JSD(β) over the teacher's top-K, both renormalised over the K ids;
    aggregated by ``loss_agg`` (token-mean: summed over tokens and divided by their count; OPSD as
    it runs, one sequence per micro-batch: seq-mean-token-mean). ``token_clip`` caps each token's divergence
    (keeps a few stylistic tokens from dominating). ``token_logprobs`` is unused (kept for a
    uniform signature)."""
    del token_logprobs
    student_topk_logprobs, teacher_topk_logprobs = masked_inputs(mask, student_topk_logprobs, teacher_topk_logprobs)
    student_logp, teacher_logp = topk_log_distributions(student_topk_logprobs, teacher_topk_logprobs, "renorm")
    per_token = generalized_jsd(student_logp, teacher_logp, beta)
    clipped = None
    if token_clip is not None:
        clipped = per_token.detach() > token_clip
        per_token = per_token.clamp(max=token_clip)
    loss = aggregate(per_token, mask, loss_agg, denominator)
    metrics = {"opsd/divergence": _masked_mean(per_token, mask)}
    metrics.update(_common_metrics("opsd", mask, entropy, clipped))
    return loss, metrics


# --------------------------------------------------------------------------- GRPO and SFT


def grpo_loss(
    token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    clip_ratio_c: float | None = None,
    loss_agg: str = "token-mean",
    entropy: torch.Tensor | None = None,
    denominator=None,
):
    """Clipped policy gradient (PPO surrogate with clip-higher):
    ``max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high))``, ``ρ = exp(logπ_θ − logπ_old)``.
    ``clip_ratio_c`` (dual clip, e.g. 3) further caps the loss of a negative-advantage token at
    ``−A·c``, so a very stale sample with a huge ratio cannot dominate the batch.

    ``advantages`` is ``[B]`` (one per sequence, e.g. ``group_relative_advantages``) or ``[B,T]``.
    Without ``old_logprobs`` the update is on-policy (ρ ≡ 1, the plain policy gradient).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = advantages.to(token_logprobs.dtype)
    old = token_logprobs.detach() if old_logprobs is None else old_logprobs
    ratio = (token_logprobs - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP).exp()
    unclipped = -advantages * ratio
    clipped_obj = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    per_token = torch.maximum(unclipped, clipped_obj)
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c={clip_ratio_c!r}: must be > 1")
        dual = torch.minimum(per_token, -advantages * clip_ratio_c)
        per_token = torch.where(advantages < 0, dual, per_token)
    loss = aggregate(per_token, mask, loss_agg, denominator)
    metrics = {
        "grpo/advantage": _masked_mean(advantages.expand_as(token_logprobs), mask),
        "grpo/ratio": _masked_mean(ratio, mask),
        # k3 estimator of KL(old‖new), always ≥ 0
        "grpo/approx_kl": _masked_mean(ratio - 1 - (token_logprobs - old), mask),
    }
    metrics.update(_common_metrics("grpo", mask, entropy, clipped_obj.detach() > unclipped.detach()))
    return loss, metrics


def sft_loss(
    token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_agg: str = "token-mean",
    entropy: torch.Tensor | None = None,
    denominator=None,
):
    """Negative log-likelihood of the masked tokens (successful or demonstration responses)."""
    loss = aggregate(-token_logprobs, mask, loss_agg, denominator)
    metrics = {"sft/nll": _masked_mean(-token_logprobs, mask)}
    metrics.update(_common_metrics("sft", mask, entropy))
    return loss, metrics
