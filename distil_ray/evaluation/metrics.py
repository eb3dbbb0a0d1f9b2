"""Sampling metrics over groups of graded responses: avg@k, pass@k, maj@k, best@k.

Conventions (one prompt, ``n`` samples in generation order):

* ``avg@k``  — mean correctness (or reward) of the first ``k`` samples.
* ``pass@k`` — probability that at least one of ``k`` samples drawn without replacement from the
  ``n`` is correct: the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)``,
  which uses all ``n`` samples.
* ``maj@k``  — correctness of the most frequent extracted answer among the first ``k`` samples
  (ties: the answer seen first; ``None`` answers are ignored; all ``None`` → incorrect).
* ``best@k`` — the highest (partial) score among the first ``k`` samples.

:func:`aggregate_grades` averages these over prompts and, given a group label per prompt (a
SciKnowEval domain, a math source, ...), also per group (``domain/chemistry/avg@16``) and as an
unweighted mean over groups (``domain_macro/avg@16``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

__all__ = [
    "pass_at_k",
    "avg_at_k",
    "majority_answer",
    "maj_at_k",
    "best_at_k",
    "default_ks",
    "prompt_metrics",
    "aggregate_grades",
]


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got a bool ({value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} ({value!r})") from None


def _check_k(k: Any, available: int) -> int:
    k = _as_int("k", k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k > available:
        raise ValueError(f"k={k} is larger than the number of samples ({available})")
    return k


def _first_k(values: Sequence, k: int | None, metric: str) -> list:
    """The first ``k`` values (all of them for ``k=None``), validated."""
    values = list(values)
    if k is None:
        if not values:
            raise ValueError(f"{metric} of an empty sequence is undefined")
        return values
    return values[: _check_k(k, len(values))]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021).

    ``1 - C(n-c, k) / C(n, k)``, evaluated as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` so that large
    ``n`` neither overflows nor loses precision.
    """
    n, c, k = _as_int("n", n), _as_int("c", c), _as_int("k", k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must satisfy 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def avg_at_k(correct: Sequence[bool | float], k: int | None = None) -> float:
    """Mean of the first ``k`` values (bools count as 0/1); ``k=None`` uses all of them."""
    values = _first_k(correct, k, "avg@k")
    return sum(float(v) for v in values) / len(values)


def majority_answer(answers: Sequence[Hashable | None], k: int | None = None) -> Hashable | None:
    """The most frequent non-``None`` answer among the first ``k``; ties go to the one seen first.

    Returns ``None`` when every answer is ``None``.
    """
    answers = list(answers)
    if k is None:
        k = len(answers)
        if k == 0:
            return None
    k = _check_k(k, len(answers))
    counts: dict[Hashable, int] = {}
    for a in answers[:k]:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1  # dicts keep first-insertion order
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a, cnt in counts.items() if cnt == best)


def maj_at_k(
    answers: Sequence[Hashable | None],
    grade: Callable[[Hashable], bool | float] | Mapping[Hashable, bool | float],
    k: int | None = None,
) -> float:
    """Correctness of the majority answer among the first ``k`` samples.

    ``grade`` is a function ``answer -> correct`` or a mapping from each answer to its correctness
    (bool or a float score). All-``None`` answers count as incorrect (0.0).
    """
    winner = majority_answer(answers, k)
    if winner is None:
        return 0.0
    if isinstance(grade, Mapping):
        if winner not in grade:
            raise KeyError(f"maj@k: the majority answer {winner!r} has no entry in the correctness map")
        return float(grade[winner])
    return float(grade(winner))


def best_at_k(scores: Sequence[float], k: int | None = None) -> float:
    """The highest of the first ``k`` scores; ``k=None`` uses all of them."""
    return float(max(float(s) for s in _first_k(scores, k, "best@k")))


def default_ks(n: int) -> list[int]:
    """Powers of two up to ``n``, plus ``n`` itself: ``16 -> [1, 2, 4, 8, 16]``, ``6 -> [1, 2, 4, 6]``."""
    n = _as_int("n", n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def prompt_metrics(grades: Sequence[Any], ks: Sequence[int]) -> dict[str, float]:
    """Metrics of one prompt's samples (objects with ``correct``, ``score``, ``reward``, ``answer``).

    ``pass@k`` uses all samples (unbiased estimator); ``avg@k``, ``maj@k`` and ``best@k`` use the
    first ``k``. For ``maj@k`` an answer's correctness is that of the first sample giving it.
    """
    grades = list(grades)
    n = len(grades)
    if n == 0:
        raise ValueError("a prompt needs at least one graded sample")
    correct = [bool(g.correct) for g in grades]
    scores = [float(g.score) for g in grades]
    answers = [g.answer for g in grades]
    answer_correct: dict[Hashable, bool] = {}
    for a, c in zip(answers, correct):
        if a is not None and a not in answer_correct:
            answer_correct[a] = c
    out = {
        "accuracy": sum(correct) / n,
        "score": sum(scores) / n,
        "reward": sum(float(g.reward) for g in grades) / n,
    }
    for k in ks:
        k = _check_k(k, n)
        out[f"avg@{k}"] = avg_at_k(correct, k)
        out[f"pass@{k}"] = pass_at_k(n, sum(correct), k)
        out[f"maj@{k}"] = maj_at_k(answers, answer_correct, k)
        out[f"best@{k}"] = best_at_k(scores, k)
    return out


def _mean_dicts(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


def aggregate_grades(
    grades: Sequence[Sequence[Any]],
    ks: Sequence[int] | None = None,
    groups: Sequence[Hashable] | None = None,
    group_name: str = "domain",
    macro: bool = True,
) -> dict[str, float]:
    """Flat metrics over prompts: ``avg@k``, ``pass@k``, ``maj@k``, ``best@k`` for each ``k``, and
    ``accuracy`` / ``score`` / ``reward`` (means over all samples of each prompt, then over prompts).

    ``grades[i]`` holds prompt ``i``'s graded samples (``Grade`` objects, in generation order).
    ``ks`` defaults to :func:`default_ks` of the smallest sample count; a ``k`` above that count is
    an error. With ``groups`` (one label per prompt), every metric is also reported per group as
    ``f"{group_name}/{label}/{metric}"`` and, if ``macro``, as the unweighted mean over groups
    ``f"{group_name}_macro/{metric}"``. ``num_prompts`` and ``num_samples`` count the inputs.

    For LiveCodeBench-style tasks (``correct`` = all tests passed, ``score`` = fraction passed),
    ``accuracy`` and ``avg@k`` are the accuracy and ``score`` the mean fraction of tests passed.
    """
    grades = [list(g) for g in grades]
    if not grades:
        raise ValueError("no prompts to aggregate")
    sizes = [len(g) for g in grades]
    if min(sizes) == 0:
        raise ValueError(f"prompt {sizes.index(0)} has no graded samples")
    n_min = min(sizes)
    ks = default_ks(n_min) if ks is None else [_as_int("k", k) for k in ks]
    for k in ks:
        if not 1 <= k <= n_min:
            raise ValueError(
                f"k={k} is not in [1, {n_min}]: the smallest prompt has {n_min} samples "
                f"(sample counts range {n_min}..{max(sizes)})"
            )
    per_prompt = [prompt_metrics(g, ks) for g in grades]
    out = _mean_dicts(per_prompt)
    out["num_prompts"] = float(len(grades))
    out["num_samples"] = float(sum(sizes))
    if groups is not None:
        groups = list(groups)
        if len(groups) != len(grades):
            raise ValueError(f"groups has {len(groups)} labels for {len(grades)} prompts")
        by_group: dict[Hashable, list[dict[str, float]]] = {}
        for label, row in zip(groups, per_prompt):
            by_group.setdefault(label, []).append(row)
        group_means = {}
        for label in sorted(by_group, key=str):
            mean = _mean_dicts(by_group[label])
            group_means[label] = mean
            for key, value in mean.items():
                out[f"{group_name}/{label}/{key}"] = value
            out[f"{group_name}/{label}/num_prompts"] = float(len(by_group[label]))
        if macro:
            for key, value in _mean_dicts(list(group_means.values())).items():
                out[f"{group_name}_macro/{key}"] = value
    return out
