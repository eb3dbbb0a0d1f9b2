"""One rule for combining metrics: counts add up, everything else is a weighted mean; ranks merge
their partial sums into exactly what one process holding every micro-batch would report."""

import pickle

import pytest

from distil_ray.telemetry.reduce import MetricsSum, is_count, reduce_metrics


def test_counts_add_and_means_are_weighted():
    total = MetricsSum().add({"distil/ce": 1.0, "distil/num_tokens": 10}, weight=10)
    total.add({"distil/ce": 4.0, "distil/num_tokens": 30}, weight=30)
    out = total.result()
    assert out["distil/num_tokens"] == 40
    assert out["distil/ce"] == pytest.approx((1.0 * 10 + 4.0 * 30) / 40)


def test_merging_rank_partials_equals_one_process():
    parts = [({"loss/x": 2.0, "num_sequences": 3}, 5.0), ({"loss/x": -1.0, "num_sequences": 1}, 1.0),
             ({"loss/x": 0.5, "num_sequences": 2}, 2.0)]
    whole = MetricsSum()
    for metrics, w in parts:
        whole.add(metrics, w)
    rank0, rank1 = MetricsSum().add(*parts[0]), MetricsSum().add(*parts[1]).add(*parts[2])
    # ranks all-gather their partial sums as pickles
    merged = MetricsSum().merge([pickle.loads(pickle.dumps(rank0)), pickle.loads(pickle.dumps(rank1))])
    assert merged.result() == pytest.approx(whole.result())


def test_updates_reduce_with_equal_weight_and_absent_keys_do_not_dilute():
    out = reduce_metrics([{"loss": 1.0, "num_tokens": 5, "only_first": 7.0}, {"loss": 3.0, "num_tokens": 6}])
    assert out == {"loss": 2.0, "num_tokens": 11, "only_first": 7.0}
    assert is_count("rollout/num_samples") and is_count("num_micro_batches") and not is_count("tokens_per_s")


def test_peaks_take_the_maximum_across_ranks_and_updates():
    assert reduce_metrics([{"learner/peak_memory_mb": 900.0}, {"learner/peak_memory_mb": 1200.0}]) == {
        "learner/peak_memory_mb": 1200.0}
    a = MetricsSum().add({"learner/max_micro_batch_tokens": 64.0})
    b = MetricsSum().add({"learner/max_micro_batch_tokens": 96.0})
    assert MetricsSum().merge([a, b]).result() == {"learner/max_micro_batch_tokens": 96.0}
