"""A tabular autoregressive policy small enough to enumerate: every prefix has its own logits.

With vocabulary V and horizon H there are V**H sequences; expectations over y ~ π_θ are exact sums.
"""

from __future__ import annotations

import itertools

import torch


class TabularPolicy:
    def __init__(self, vocab: int, horizon: int, seed: int, scale: float = 1.0, dtype=torch.float64):
        gen = torch.Generator().manual_seed(seed)
        self.vocab, self.horizon = vocab, horizon
        self.prefixes = [p for n in range(horizon) for p in itertools.product(range(vocab), repeat=n)]
        self.index = {p: i for i, p in enumerate(self.prefixes)}
        self.theta = (scale * torch.randn(len(self.prefixes), vocab, generator=gen, dtype=dtype)).requires_grad_()
        # the teacher: a fixed table over the same prefixes (it sees feedback the student does not)
        self.teacher_logits = scale * torch.randn(len(self.prefixes), vocab, generator=gen, dtype=dtype)

    def sequences(self):
        return list(itertools.product(range(self.vocab), repeat=self.horizon))

    def rows(self, y):
        return [self.index[tuple(y[:t])] for t in range(self.horizon)]

    def student_logp(self, y) -> torch.Tensor:
        """``[H, V]`` log π_θ(·|s_t) along y (differentiable)."""
        return torch.log_softmax(self.theta[self.rows(y)], -1)

    def teacher_logp(self, y) -> torch.Tensor:
        return torch.log_softmax(self.teacher_logits[self.rows(y)], -1)

    def seq_logprob(self, y) -> torch.Tensor:
        logp = self.student_logp(y)
        return logp[torch.arange(self.horizon), torch.tensor(y)].sum()

    def loss_inputs(self, y):
        """The inputs a loss sees for one rollout, K = V (teacher 'top-k' = the whole vocabulary)."""
        s, t = self.student_logp(y), self.teacher_logp(y)
        tok = s[torch.arange(self.horizon), torch.tensor(y)]
        return tok[None], s[None], t[None], torch.ones(1, self.horizon, dtype=torch.bool)

    def exact_objective(self) -> torch.Tensor:
        """L(θ) = Σ_y π_θ(y) Σ_t CE(π_T(·|s_t), π_θ(·|s_t)), by enumeration."""
        total = 0.0
        for y in self.sequences():
            s, t = self.student_logp(y), self.teacher_logp(y)
            ce = -(t.exp() * s).sum()
            total = total + self.seq_logprob(y).exp() * ce
        return total

    def grad(self, scalar: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        (g,) = torch.autograd.grad(scalar, self.theta, retain_graph=retain_graph)
        return g
