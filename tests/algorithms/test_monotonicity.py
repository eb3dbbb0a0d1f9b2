"""The monotonicity claim, on a one-step bandit (softmax student q over a few actions, a teacher p
with higher expected reward E_p[r] > E_q[r]).

What is verified, exactly:

1. *Counter-example* (``test_reverse_kl_and_jsd_step_can_lower_reward``): there is an instance on
   which one small gradient step on the student's logits of reverse KL(q‖p) (SDPO α=1) and of
   JSD (α=0.5) both raise the probability of a worse action (reward below E_q[r], and the teacher
   gives it less mass than the student) and lower E_q[r], while one forward-CE step on the same
   instance raises E_q[r].

2. *Caveat* (``test_plain_logit_steps_guarantee_nothing``): a plain logit-gradient step of forward
   CE also lowers E_q[r] on some instances — the guarantee is not about logit steps.

3. *The guarantee* (``test_forward_ce_update_never_lowers_reward``): the update forward CE induces
   on the distribution is the arithmetic mixture q_η = (1−η)q + ηp — it is the exact minimiser of
   the proximal objective η·H×(p, q') + (1−η)·H×(q, q') (checked: the gradient of that objective,
   built from the library's ``cross_entropy``, vanishes there). For it,
   E_{q_η}[r] = (1−η)E_q[r] + ηE_p[r] ≥ E_q[r] for every η ∈ [0,1], increasing in η, and every
   action's probability moves towards the teacher's (sign(q_η(a) − q(a)) = sign(p(a) − q(a))).
   Checked over thousands of random instances and step sizes.

4. *The contrast* (``test_reverse_kl_update_can_lower_reward``): the update reverse KL induces,
   the geometric mixture q^(1−η)p^η / Z — exact minimiser of η·KL(q'‖p) + (1−η)·KL(q'‖q)
   (checked the same way with the library's ``kl``) — lowers E[r] on a sizeable fraction of the
   same random instances, and raises actions the teacher wants less of.

Statements 3 and 4 are properties of idealised updates in distribution space (what each loss's
proximal step produces), not of the learner's logit steps (statement 2 shows those promise
nothing). The link to the library is ``test_mixtures_are_the_proximal_steps_of_each_loss``; the
two reward checks are numerical confirmations of the mixtures' algebra.
"""

import torch

from distil_ray.algorithms.losses import ce_loss, cross_entropy, kl, sdpo_loss

DT = torch.float64


def random_instance(seed: int, n_actions: int = 4):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.rand(n_actions, generator=gen, dtype=DT)
    student_logits = 2 * torch.randn(n_actions, generator=gen, dtype=DT)
    teacher = torch.softmax(2 * torch.randn(n_actions, generator=gen, dtype=DT), -1)
    return rewards, student_logits, teacher


def better_teacher_instances(n: int, n_actions: int = 4):
    seed = 0
    while n:
        r, z, p = random_instance(seed, n_actions)
        seed += 1
        if (p * r).sum() > (torch.softmax(z, -1) * r).sum():
            n -= 1
            yield r, z, p


def logit_step(z, p, loss_fn, eta, **kwargs):
    """One gradient step of a library loss on the logits of a one-token 'sequence' (K = all actions)."""
    z = z.clone().requires_grad_()
    logq = torch.log_softmax(z, -1)
    loss, _ = loss_fn(logq[None, None, :1], logq[None, None], p.log()[None, None], torch.ones(1, 1), **kwargs)
    (g,) = torch.autograd.grad(loss, z)
    return torch.softmax(z.detach() - eta * g, -1)


STEPS = {
    "reverse_kl": lambda z, p, eta: logit_step(z, p, sdpo_loss, eta, alpha=1.0, topk_norm="renorm"),
    "jsd": lambda z, p, eta: logit_step(z, p, sdpo_loss, eta, alpha=0.5, topk_norm="renorm"),
    "forward_ce": lambda z, p, eta: logit_step(z, p, ce_loss, eta),
}


def arithmetic(q, p, eta):
    return (1 - eta) * q + eta * p


def geometric(q, p, eta):
    g = q ** (1 - eta) * p**eta
    return g / g.sum()


def test_reverse_kl_and_jsd_step_can_lower_reward():
    eta = 1e-3
    for seed, (r, z, p) in enumerate(better_teacher_instances(200)):
        q = torch.softmax(z, -1)
        base = (q * r).sum()
        after = {name: step(z, p, eta) for name, step in STEPS.items()}
        worse_action = (r < base) & (p < q)
        lowers = {k: bool((v * r).sum() < base) for k, v in after.items()}
        raises_worse = {k: bool(((v > q) & worse_action).any()) for k, v in after.items()}
        if lowers["reverse_kl"] and lowers["jsd"] and raises_worse["reverse_kl"] and raises_worse["jsd"]:
            if not lowers["forward_ce"]:
                deltas = {k: float((v * r).sum() - base) for k, v in after.items()}
                print(f"instance {seed}: r={r.tolist()} q={q.tolist()} p={p.tolist()} ΔE[r]={deltas}")
                assert deltas["forward_ce"] > 0 > max(deltas["reverse_kl"], deltas["jsd"])
                return
    raise AssertionError("no counter-example among 200 instances")


def test_plain_logit_steps_guarantee_nothing():
    eta = 1e-3
    lowered = {name: 0 for name in STEPS}
    n = 400
    for r, z, p in better_teacher_instances(n):
        base = (torch.softmax(z, -1) * r).sum()
        for name, step in STEPS.items():
            lowered[name] += int((step(z, p, eta) * r).sum() < base)
    print({k: v / n for k, v in lowered.items()})
    # every one of them lowers the reward somewhere: a logit step alone promises nothing
    assert all(v > 0 for v in lowered.values())


def _zero_grad_at(objective, target):
    z = target.log().clone().requires_grad_()
    (g,) = torch.autograd.grad(objective(torch.log_softmax(z, -1)), z)
    return g.abs().max()


def test_mixtures_are_the_proximal_steps_of_each_loss():
    for r, z, p in better_teacher_instances(50):
        q = torch.softmax(z, -1)
        logq, logp = q.log(), p.log()
        for eta in (0.01, 0.3, 0.9):
            fce = lambda s: eta * cross_entropy(logp, s) + (1 - eta) * cross_entropy(logq, s)  # noqa: E731
            rkl = lambda s: eta * kl(s, logp) + (1 - eta) * kl(s, logq)  # noqa: E731
            assert _zero_grad_at(fce, arithmetic(q, p, eta)) < 1e-12
            assert _zero_grad_at(rkl, geometric(q, p, eta)) < 1e-12
            # ... and only there: the gradient is clearly non-zero at the start and at the other mixture
            for objective, elsewhere in ((fce, geometric(q, p, eta)), (rkl, arithmetic(q, p, eta))):
                assert _zero_grad_at(objective, q) > 1e-3 * eta
                assert _zero_grad_at(objective, elsewhere) > 1e-8
            # and they really are different points
            assert (arithmetic(q, p, eta) - geometric(q, p, eta)).abs().max() > 1e-6


def test_forward_ce_update_never_lowers_reward():
    etas = torch.tensor([1e-4, 1e-3, 0.01, 0.1, 0.3, 0.5, 0.9, 1.0], dtype=DT)
    for n_actions in (2, 3, 5, 8):
        for r, z, p in better_teacher_instances(1000, n_actions):
            q = torch.softmax(z, -1)
            rewards = torch.stack([(arithmetic(q, p, eta) * r).sum() for eta in etas])
            assert rewards[0] >= (q * r).sum() - 1e-15
            assert (rewards.diff() >= -1e-15).all()
            moved = arithmetic(q, p, 0.1) - q
            assert ((moved * (p - q)) >= 0).all()


def test_reverse_kl_update_can_lower_reward():
    n, lowered, raised_unwanted = 1000, 0, 0
    for r, z, p in better_teacher_instances(n):
        q = torch.softmax(z, -1)
        geo = geometric(q, p, 1e-3)
        lowered += int((geo * r).sum() < (q * r).sum())
        raised_unwanted += int(((geo > q) & (p < q)).any())
    print(f"geometric mixture lowers E[r] on {lowered}/{n}, raises an action the teacher wants less of on {raised_unwanted}/{n}")
    assert lowered > n // 50 and raised_unwanted > n // 50
