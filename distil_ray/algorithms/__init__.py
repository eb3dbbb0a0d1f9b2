"""Algorithms by name: each is a pure loss function plus what the learner must feed it.

The learner looks an algorithm up here and builds exactly the inputs it declares; nothing in this
package knows about Ray, models or data loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from distil_ray.algorithms import losses
from distil_ray.algorithms.advantages import future_returns, group_loo_baseline, group_relative_advantages


@dataclass(frozen=True)
class Algorithm:
    name: str
    loss_fn: Callable
    needs_teacher: bool  # teacher top-k log-probs must be scored for each rollout
    needs_advantages: bool  # group-relative advantages from rewards
    train_on: str = "all"  # "all" rollouts, or "successful" ones only (SFT)


ALGORITHMS: dict[str, Algorithm] = {
    "distil": Algorithm("distil", losses.distil_loss, needs_teacher=True, needs_advantages=False),
    "ce": Algorithm("ce", losses.ce_loss, needs_teacher=True, needs_advantages=False),
    "sdpo": Algorithm("sdpo", losses.sdpo_loss, needs_teacher=True, needs_advantages=False),
    "opsd": Algorithm("opsd", losses.opsd_loss, needs_teacher=True, needs_advantages=False),
    "grpo": Algorithm("grpo", losses.grpo_loss, needs_teacher=False, needs_advantages=True),
    "sft": Algorithm("sft", losses.sft_loss, needs_teacher=False, needs_advantages=False, train_on="successful"),
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algorithm.name={name!r}: allowed values are {tuple(ALGORITHMS)}") from None


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "get_algorithm",
    "future_returns",
    "group_loo_baseline",
    "group_relative_advantages",
    "losses",
]
