"""avg@k / pass@k / maj@k / best@k against brute force and hand-computed aggregates."""

from __future__ import annotations

import itertools
import random

import pytest

from distil_ray.evaluation.metrics import (
    aggregate_grades,
    avg_at_k,
    best_at_k,
    default_ks,
    maj_at_k,
    majority_answer,
    pass_at_k,
)
from distil_ray.tasks.base import Grade


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def g(correct: bool, answer=None, score=None, reward=None) -> Grade:
    score = float(correct) if score is None else score
    return Grade(reward=score if reward is None else reward, correct=correct, score=score, feedback="", answer=answer)


# ---------------------------------------------------------------- pass@k


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration_of_all_k_subsets(n):
    rng = random.Random(n)
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        rng.shuffle(correct)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(correct, k), abs=1e-12)


def test_pass_at_k_edge_cases_and_large_n_stability():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every 3-subset holds a correct sample
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    # huge n: the binomials overflow floats, the product form does not
    assert pass_at_k(100_000, 1, 1) == pytest.approx(1e-5, rel=1e-9)
    assert pass_at_k(100_000, 50_000, 2) == pytest.approx(1 - (50_000 * 49_999) / (100_000 * 99_999), rel=1e-9)


@pytest.mark.parametrize(
    "n, c, k, match",
    [(4, 1, 5, "k must satisfy"), (4, 1, 0, "k must satisfy"), (4, 5, 1, "c must satisfy"),
     (4, -1, 1, "c must satisfy"), (0, 0, 1, "n must be")],
)
def test_pass_at_k_validation(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_pass_at_k_rejects_non_integers():
    with pytest.raises(TypeError, match="integer"):
        pass_at_k(4.0, 1, 1)
    with pytest.raises(TypeError, match="bool"):
        pass_at_k(4, True, 1)


# ---------------------------------------------------------------- avg / best / maj


def test_avg_and_best_use_only_the_first_k():
    assert avg_at_k([True, False, True, True], 2) == 0.5
    assert avg_at_k([True, False, True, True]) == 0.75
    assert avg_at_k([0.5, 1.0, 0.0], 3) == pytest.approx(0.5)
    assert best_at_k([0.1, 0.4, 0.9], 2) == 0.4
    assert best_at_k([0.1, 0.4, 0.9]) == 0.9
    with pytest.raises(ValueError, match="larger than the number of samples"):
        avg_at_k([True], 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        best_at_k([1.0], 0)


def test_majority_ties_go_to_the_answer_seen_first_and_none_is_ignored():
    assert majority_answer(["B", "A", "A", "B"]) == "B"  # 2-2 tie, B first
    assert majority_answer(["B", "A", "A", "B"], k=3) == "A"  # A wins among the first 3
    assert majority_answer([None, None, "C", None]) == "C"  # None never wins
    assert majority_answer([None, None]) is None


def test_maj_at_k_with_a_map_or_a_function():
    answers = ["7", "8", "8", None, "7", "7"]
    right = {"7": True, "8": False}
    assert maj_at_k(answers, right, k=3) == 0.0  # "8" is the mode of the first 3
    assert maj_at_k(answers, right, k=6) == 1.0  # "7" three times
    assert maj_at_k(answers, lambda a: a == "7", k=6) == 1.0
    assert maj_at_k([None, None, None], right, k=3) == 0.0  # all None → incorrect
    assert maj_at_k(["x"], {"x": 0.25}, k=1) == 0.25  # partial scores pass through
    with pytest.raises(KeyError, match="no entry"):
        maj_at_k(["z"], right, k=1)


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(6) == [1, 2, 4, 6]


# ---------------------------------------------------------------- aggregation


def test_aggregate_by_hand_with_domains():
    grades = [
        # prompt 0 (chemistry): 1 of 4 correct; answers B, A, D, B -> mode B (wrong)
        [g(False, "B"), g(True, "A"), g(False, "D"), g(False, "B")],
        # prompt 1 (chemistry): 0 correct, no answers
        [g(False, None), g(False, None), g(False, None), g(False, None)],
        # prompt 2 (physics): 3 of 4 correct; mode "C"
        [g(True, "C"), g(False, "D"), g(True, "C"), g(True, "C")],
    ]
    out = aggregate_grades(grades, ks=[1, 2, 4], groups=["chemistry", "chemistry", "physics"])

    # per prompt: avg@1 = [0, 0, 1]; avg@2 = [.5, 0, .5]; avg@4 = [.25, 0, .75]
    assert out["avg@1"] == pytest.approx(1 / 3)
    assert out["avg@2"] == pytest.approx((0.5 + 0 + 0.5) / 3)
    assert out["avg@4"] == pytest.approx((0.25 + 0 + 0.75) / 3)
    # pass@2: prompt 0: 1 - C(3,2)/C(4,2) = 0.5; prompt 1: 0; prompt 2: 1
    assert out["pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert out["pass@1"] == pytest.approx(out["avg@4"])  # pass@1 is the mean accuracy
    # maj@4: prompt 0: B wrong; prompt 1: all None -> 0; prompt 2: C right
    assert out["maj@4"] == pytest.approx(1 / 3)
    # maj@1 is the first sample's correctness when it has an answer
    assert out["maj@1"] == pytest.approx(1 / 3)
    assert out["best@4"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(out["avg@4"])
    assert out["num_prompts"] == 3 and out["num_samples"] == 12

    assert out["domain/chemistry/avg@4"] == pytest.approx(0.125)
    assert out["domain/chemistry/pass@2"] == pytest.approx(0.25)
    assert out["domain/chemistry/num_prompts"] == 2
    assert out["domain/physics/avg@4"] == pytest.approx(0.75)
    assert out["domain/physics/maj@4"] == 1.0
    assert out["domain_macro/avg@4"] == pytest.approx((0.125 + 0.75) / 2)


def test_aggregate_partial_scores_like_livecodebench():
    # correct = all tests passed, score = fraction of tests passed
    grades = [
        [g(False, score=0.5), g(True, score=1.0)],
        [g(False, score=0.0), g(False, score=0.25)],
    ]
    out = aggregate_grades(grades, ks=[1, 2], groups=["easy", "hard"], group_name="difficulty")
    assert out["accuracy"] == pytest.approx(0.25)
    assert out["score"] == pytest.approx((0.75 + 0.125) / 2)
    assert out["best@1"] == pytest.approx(0.25)
    assert out["best@2"] == pytest.approx((1.0 + 0.25) / 2)
    assert out["difficulty/hard/score"] == pytest.approx(0.125)
    assert "domain/easy/score" not in out


def test_aggregate_default_ks_and_errors():
    grades = [[g(True, "1")] * 4, [g(False, "2")] * 6]
    out = aggregate_grades(grades)
    assert {"avg@1", "avg@2", "avg@4"} <= set(out) and "avg@8" not in out
    with pytest.raises(ValueError, match=r"k=6 is not in \[1, 4\]"):
        aggregate_grades(grades, ks=[6])
    with pytest.raises(ValueError, match="groups has 1 labels for 2 prompts"):
        aggregate_grades(grades, groups=["a"])
    with pytest.raises(ValueError, match="no graded samples"):
        aggregate_grades([[g(True)], []])
    with pytest.raises(ValueError, match="no prompts"):
        aggregate_grades([])
