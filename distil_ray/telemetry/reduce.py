"""How a metric combines across micro-batches, optimizer updates and learner ranks — decided once.

A *count* (tokens, sequences, samples, micro-batches) adds up; a *peak* (memory, the largest
micro-batch) is the maximum; every other metric is a mean, weighted by what each part covered (its
loss tokens within a step; one per update across updates).
The learner reduces micro-batches and ranks with the same :class:`MetricsSum`, and the driver
reduces a batch's updates with it too, so a key is never summed in one place and averaged in another.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

COUNT_SUFFIXES = ("num_tokens", "num_sequences", "num_samples", "num_micro_batches")
PEAK_SUFFIXES = ("peak_memory_mb", "max_micro_batch_tokens")


def is_count(key: str) -> bool:
    return key.endswith(COUNT_SUFFIXES)


def is_peak(key: str) -> bool:
    return key.endswith(PEAK_SUFFIXES)


class MetricsSum:
    """Running ``Σ weight·value`` and ``Σ weight`` per key (counts: ``Σ value``; peaks: the
    maximum); picklable, so ranks can all-gather their partial sums and :meth:`merge` them."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}  # key -> [Σ weight·value (or Σ value, or max), Σ weight]

    def add(self, metrics: Mapping[str, float], weight: float = 1.0) -> "MetricsSum":
        for key, value in metrics.items():
            if is_peak(key):
                acc = self.sums.setdefault(key, [float("-inf"), 0.0])
                acc[0] = max(acc[0], float(value))
                continue
            acc = self.sums.setdefault(key, [0.0, 0.0])
            if is_count(key):
                acc[0] += float(value)
            else:
                acc[0] += weight * float(value)
                acc[1] += weight
        return self

    def merge(self, others: Iterable["MetricsSum"]) -> "MetricsSum":
        for other in others:
            for key, (num, den) in other.sums.items():
                if is_peak(key):
                    acc = self.sums.setdefault(key, [float("-inf"), 0.0])
                    acc[0] = max(acc[0], num)
                    continue
                acc = self.sums.setdefault(key, [0.0, 0.0])
                acc[0] += num
                acc[1] += den
        return self

    def result(self) -> dict[str, float]:
        return {key: num if is_count(key) or is_peak(key) else (num / den if den else 0.0)
                for key, (num, den) in sorted(self.sums.items())}


def reduce_metrics(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Equal-weight reduction of whole results (e.g. the updates of one generation batch)."""
    total = MetricsSum()
    for part in parts:
        total.add(part)
    return total.result()
