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

    def sequences(self, eos: int | None = None):
        """All sequences of length ``horizon``; with ``eos``, every sequence that ends at its first
        EOS or at the horizon (variable lengths, probabilities still summing to 1)."""
        full = list(itertools.product(range(self.vocab), repeat=self.horizon))
        if eos is None:
            return full
        out = set()
        for y in full:
            out.add(y[: y.index(eos) + 1] if eos in y else y)
        return sorted(out)

    def rows(self, y):
        return [self.index[tuple(y[:t])] for t in range(len(y))]

    def student_logp(self, y) -> torch.Tensor:
        """``[H, V]`` log π_θ(·|s_t) along y (differentiable)."""
        return torch.log_softmax(self.theta[self.rows(y)], -1)

    def teacher_logp(self, y) -> torch.Tensor:
        return torch.log_softmax(self.teacher_logits[self.rows(y)], -1)

    def seq_logprob(self, y) -> torch.Tensor:
        logp = self.student_logp(y)
        return logp[torch.arange(len(y)), torch.tensor(y)].sum()

    def loss_inputs(self, y, pad: str = "right"):
        """The inputs a loss sees for one rollout, K = V (teacher 'top-k' = the whole vocabulary),
        padded to the horizon on the given side."""
        s, t = self.student_logp(y), self.teacher_logp(y)
        tok = s[torch.arange(len(y)), torch.tensor(y)]
        mask = torch.ones(len(y), dtype=torch.bool)
        n_pad = self.horizon - len(y)

        def padded(x):
            z = torch.zeros((n_pad,) + x.shape[1:], dtype=x.dtype)
            return torch.cat([z, x] if pad == "left" else [x, z])[None]

        return padded(tok), padded(s), padded(t), padded(mask)

    def exact_objective(self, eos: int | None = None) -> torch.Tensor:
        """L(θ) = Σ_y π_θ(y) Σ_t CE(π_T(·|s_t), π_θ(·|s_t)), by enumeration."""
        total = 0.0
        for y in self.sequences(eos):
            s, t = self.student_logp(y), self.teacher_logp(y)
            ce = -(t.exp() * s).sum()
            total = total + self.seq_logprob(y).exp() * ce
        return total

    def grad(self, scalar: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        (g,) = torch.autograd.grad(scalar, self.theta, retain_graph=retain_graph)
        return g
