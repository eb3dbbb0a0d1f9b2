"""The two-formats task: two codes, grading in either format, feedback that states only format A's
code and never reveals the student's format, and warm-start examples whose format letter is a free
choice while the format-A digits must be read from the context."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from distil_ray.feedback.templates import OPSD_TEMPLATE, RepromptConfig, reprompt_group
from distil_ray.models import TinyModelConfig, build_tokenizer
from distil_ray.tasks import get_task
from distil_ray.tasks.two_formats import TwoFormatsConfig, TwoFormatsTask


@pytest.fixture(scope="module")
def task() -> TwoFormatsTask:
    return TwoFormatsTask()


def test_registered_deterministic_and_split(task):
    again = get_task("two_formats")
    assert again.codes == task.codes and again.known == task.known
    train, test = task.load("train"), task.load("test")
    assert len(test) == 128 and len(train) + len(test) == 10**4
    assert not {e.uid for e in train} & {e.uid for e in test}
    assert TwoFormatsTask(TwoFormatsConfig(seed=1)).codes != task.codes
    with pytest.raises(ValueError, match="valid splits: train, test"):
        task.load("validation")


def test_the_codes_differ_on_every_letter(task):
    assert sorted(task.codes["A"].values()) == list("0123456789")
    assert all(task.codes["A"][s] != task.codes["B"][s] for s in task.symbols)
    assert len(task.known) == 4


def test_grading_in_either_format(task):
    ex = task.make_example(task.symbols[:4], "test")
    a, b = ex.reference["answers"]["A"], ex.reference["answers"]["B"]
    assert a[0] == "A" and b[0] == "B" and a[1:] != b[1:]
    assert ex.reference["solution"] == a
    for right in (a, b, f"  {a}\n"):
        g = task.grade(ex, right)
        assert g.correct and g.reward == 1.0 and g.score == 1.0 and g.answer == right.strip()
    # A's digits under B (and B's under A) are wrong: the format letter matters
    crossed = task.grade(ex, "B" + a[1:])
    assert not crossed.correct and crossed.reward == 0.0 and crossed.details["format"] == "B"
    wrong_one = "A" + a[1:4] + str((int(a[4]) + 1) % 10)
    g = task.grade(ex, wrong_one)
    assert not g.correct and g.score == 0.75
    for malformed in ("", "7291", "C1234", "A 1234", "A12x4"):
        g = task.grade(ex, malformed)
        assert not g.correct and not g.details["format_ok"] and g.answer is None


def test_feedback_states_the_a_code_and_never_the_format(task):
    ex = task.make_example(task.symbols[:4], "test")
    a, b = ex.reference["answers"]["A"], ex.reference["answers"]["B"]
    wrong_a, wrong_b = "A0000" if a != "A0000" else "A1111", "B0000" if b != "B0000" else "B1111"
    feedbacks = {r: task.grade(ex, r).feedback for r in (a, b, wrong_a, wrong_b, "", "hello")}
    for text in feedbacks.values():
        assert text.endswith(f"The format-A code is {a[1:]}.")
        assert b[1:] not in text  # nothing about format B
    # the same text after either format: the feedback does not say which one the student chose
    assert feedbacks[a] == feedbacks[b] == "Your answer is correct. The format-A code is " + a[1:] + "."
    assert feedbacks[wrong_a] == feedbacks[wrong_b] == "Your answer is wrong. The format-A code is " + a[1:] + "."


def test_feedback_only_contexts_leave_a_successful_siblings_answer_out(task):
    ex = task.make_example(task.symbols[:4], "test")
    a = ex.reference["answers"]["A"]
    responses = [a, "B0000", "A0000"]
    grades = [task.grade(ex, r) for r in responses]
    args = (ex.messages, responses, [g.reward for g in grades], [g.feedback for g in grades])
    with_sibling = reprompt_group(*args, RepromptConfig())
    assert with_sibling[1].used_solution and a in with_sibling[1].messages[-1]["content"]
    feedback_only = reprompt_group(*args, RepromptConfig(include_solution=False))
    for ctx, g in zip(feedback_only, grades):
        assert not ctx.used_solution and ctx.used_feedback
        assert a not in ctx.messages[-1]["content"] and g.feedback in ctx.messages[-1]["content"]


def test_warm_start_format_is_a_free_choice_and_a_digits_come_from_the_context(task):
    rng = random.Random(0)
    examples = task.warm_start_examples(4000, rng, context_fraction=0.6)
    formats = Counter(target[0] for _, target in examples)
    assert abs(formats["A"] / len(examples) - 0.5) < 0.03
    kinds = Counter()
    for messages, target in examples:
        content = messages[-1]["content"]
        symbols = content.split(":")[1].split()[:4]
        if "The format-A code is" in content or "reference solution" in content:
            stated = content.split("The format-A code is ")[1][:4] if "code is" in content else \
                content.split("reference solution to this problem:\n")[1][1:5]
            kinds["reference" if "reference solution" in content else "feedback"] += 1
            if target[0] == "A":
                assert target[1:] == stated  # read from the context
            else:  # the context says nothing about B: known letters right, a guess elsewhere
                for s, d in zip(symbols, target[1:]):
                    if s in task.known:
                        assert d == task.codes["B"][s]
        else:
            kinds["plain"] += 1
            for s, d in zip(symbols, target[1:]):
                if s in task.known:
                    assert d == task.codes[target[0]][s]
    assert abs(kinds["plain"] / len(examples) - 0.4) < 0.03
    assert abs(kinds["reference"] / (kinds["reference"] + kinds["feedback"]) - 0.5) < 0.03
    # the reference-solution contexts are OPSD's own template
    ref = next(m for m, _ in examples if "reference solution" in m[-1]["content"])
    assert ref[-1]["content"].startswith(OPSD_TEMPLATE.split("{prompt}")[0])


def test_format_letter_and_digits_are_single_tokens(task):
    tok = build_tokenizer(TinyModelConfig(extra_corpus=list(task.tokenizer_corpus())))
    ids = tok.encode("A7291", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == ["A", "7", "2", "9", "1"]
    assert len(tok.encode("B0381", add_special_tokens=False)) == 5


@pytest.mark.parametrize("bad, key", [({"length": 0}, "length"), ({"num_known": 11}, "num_known"),
                                      ({"test_size": 10**4}, "test_size"),
                                      ({"reference_fraction": 1.5}, "reference_fraction")])
def test_bad_options_name_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        TwoFormatsConfig(**bad)
