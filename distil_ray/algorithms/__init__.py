"""Algorithms by name: each is a pure loss function plus what the learner must feed it.

The learner looks an algorithm up here and builds exactly the inputs it declares; nothing in this
package knows about Ray, models or data loading.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Callable, Optional

from distil_ray.algorithms import losses
from distil_ray.algorithms.advantages import future_returns, group_loo_baseline, group_relative_advantages


@dataclass(frozen=True)
class Algorithm:
    name: str
    loss_fn: Callable
    needs_teacher: bool  # teacher top-k log-probs must be scored for each rollout
    needs_advantages: bool  # group-relative advantages from rewards
    train_on: str = "all"  # "all" rollouts, or "successful" ones only (SFT)

    @property
    def loss_config(self) -> type:
        """The loss's hyper-parameters as a typed section (``algorithm.loss``): a dataclass read off
        the loss function's keyword-only parameters, so the two can never drift apart. What the
        learner supplies per batch (:data:`LOSS_RUNTIME_ARGS`) is not configuration."""
        return loss_config_class(self.loss_fn)


# Loss arguments the learner supplies per batch; a config that set them would be overwritten.
LOSS_RUNTIME_ARGS = frozenset({"group_ids", "behaviour_logprobs", "old_logprobs", "entropy", "denominator",
                               "credit_baseline_values"})


@functools.cache
def loss_config_class(loss_fn: Callable) -> type:
    """A dataclass of ``loss_fn``'s configurable keyword-only parameters (types and defaults from
    its signature). The local-only ``ce_loss`` forwards to ``distil_loss`` with future credit
    switched off: its section is DistIL's without ``future_credit_coef``."""
    fn, dropped = loss_fn, set(LOSS_RUNTIME_ARGS)
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(loss_fn).parameters.values()):
        fn, dropped = losses.distil_loss, dropped | {"future_credit_coef"}
    hints = typing.get_type_hints(fn)
    fields = [
        (n, _plain_type(hints[n]), dataclasses.field(default=p.default))
        for n, p in inspect.signature(fn).parameters.items()
        if p.kind is p.KEYWORD_ONLY and n not in dropped
    ]
    name = "".join(part.capitalize() for part in loss_fn.__name__.split("_")) + "Config"  # DistilLossConfig
    return dataclasses.make_dataclass(name, fields, frozen=True)


def _plain_type(hint):
    """``X | None`` as ``Optional[X]``: the spelling OmegaConf's type checks understand."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return Optional[inner]
    return hint


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
    "LOSS_RUNTIME_ARGS",
    "Algorithm",
    "get_algorithm",
    "future_returns",
    "group_loo_baseline",
    "group_relative_advantages",
    "losses",
]
