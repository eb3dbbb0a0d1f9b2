"""Toy secret-code task: deterministic disjoint splits, grading and position-level feedback, and
warm-start examples that are exactly the teacher contexts training builds."""

from __future__ import annotations

import random

import pytest

from distil_ray.feedback.templates import RepromptConfig
from distil_ray.models import TinyModelConfig, build_tokenizer
from distil_ray.tasks import get_task
from distil_ray.tasks.toy import LETTERS, ToyConfig, ToyTask, grade_code


@pytest.fixture(scope="module")
def task() -> ToyTask:
    return ToyTask()


def example_for(task: ToyTask, symbols: str):
    return task.make_example(tuple(symbols), "test")


# ---------------------------------------------------------------- splits


def test_registered_and_deterministic(task):
    again = get_task("toy")
    assert isinstance(again, ToyTask)
    assert again.code == task.code and again.known == task.known
    assert [e.uid for e in again.load("test")] == [e.uid for e in task.load("test")]
    other = ToyTask(ToyConfig(seed=1))
    assert other.code != task.code or [e.uid for e in other.load("test")] != [
        e.uid for e in task.load("test")
    ]


def test_splits_are_disjoint_and_sized(task):
    train, test = task.load("train"), task.load("test")
    assert len(test) == 128
    assert (
        len(train) + len(test) == 10**3
    )  # every 3-letter string over 10 letters, once
    train_prompts = {e.messages[-1]["content"] for e in train}
    test_prompts = {e.messages[-1]["content"] for e in test}
    assert not train_prompts & test_prompts
    assert len({e.uid for e in train + test}) == len(train) + len(test)
    assert len(ToyTask(ToyConfig(train_size=50)).load("train")) == 50


def test_unknown_split_lists_the_valid_ones(task):
    with pytest.raises(ValueError, match="valid splits: train, test"):
        task.load("validation")


def test_code_is_a_permutation_and_answers_follow_it(task):
    assert sorted(task.code.values()) == list("0123456789")
    assert set(task.symbols) <= set(LETTERS)
    for e in task.load("test")[:20]:
        assert e.reference["answer"] == "".join(
            task.code[s] for s in e.reference["symbols"]
        )
        # the answer key never reaches the student's context
        assert e.reference["answer"] not in e.messages[-1]["content"]


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="^num_known=11"):
        ToyConfig(num_known=11)
    with pytest.raises(ValueError, match="^test_size=1000"):
        ToyConfig(test_size=1000)
    with pytest.raises(ValueError, match="^feedback_style='terse': allowed values are 'corrected', 'wrong'"):
        ToyConfig(feedback_style="terse")
    with pytest.raises(ValueError, match="feedback_style"):
        grade_code("ab", "12", "12", "terse")


def test_every_letter_is_one_token_with_its_space():
    tok = build_tokenizer(TinyModelConfig())
    for letter in LETTERS:
        assert len(tok.encode(f" {letter}", add_special_tokens=False)) == 1, letter
    task = ToyTask()
    ids = tok.encode(task.prompt_text(task.symbols[:3]), add_special_tokens=False)
    assert [tok.decode([i]) for i in ids[-3:]] == [f" {s}" for s in task.symbols[:3]]


# ---------------------------------------------------------------- grading


def test_correct_answer(task):
    e = example_for(task, task.symbols[:3])
    g = task.grade(e, e.reference["answer"])
    assert (g.reward, g.correct, g.score, g.answer) == (
        1.0,
        True,
        1.0,
        e.reference["answer"],
    )
    assert g.feedback == f"Your answer {e.reference['answer']} is correct."
    assert task.grade(e, f"  {e.reference['answer']}\n").correct


def test_one_wrong_digit_names_the_position_the_letter_and_the_right_digit(task):
    e = example_for(task, task.symbols[:3])
    gold = e.reference["answer"]
    wrong_digit = str((int(gold[1]) + 1) % 10)
    attempt = gold[0] + wrong_digit + gold[2]
    g = task.grade(e, attempt)
    assert (g.reward, g.correct, g.answer) == (0.0, False, attempt)
    assert g.score == pytest.approx(2 / 3)
    assert g.details["wrong_positions"] == [2]
    assert g.feedback == (
        f"Your answer {attempt} is wrong at position 2. Position 2: '{task.symbols[1]}' is {gold[1]}, "
        f"not {wrong_digit}. The correct answer is {gold}."
    )
    # the "wrong" style keeps the notes and leaves the corrected answer out
    g2 = grade_code(e.reference["symbols"], gold, attempt, "wrong")
    assert g2.feedback.endswith(
        f"Position 2: '{task.symbols[1]}' is {gold[1]}, not {wrong_digit}."
    )
    assert (
        "Position 1" not in g2.feedback
        and "Position 3" not in g2.feedback
        and f"is {gold}" not in g2.feedback
    )


def test_two_wrong_digits_are_both_named(task):
    e = example_for(task, task.symbols[3:6])
    gold = e.reference["answer"]
    attempt = "".join(str((int(d) + 1) % 10) for d in gold[:2]) + gold[2]
    g = task.grade(e, attempt)
    assert g.details["wrong_positions"] == [1, 2] and g.score == pytest.approx(1 / 3)
    assert "wrong at positions 1 and 2." in g.feedback
    assert (
        f"Position 1: '{task.symbols[3]}' is {gold[0]}, not {attempt[0]}." in g.feedback
    )
    assert (
        f"Position 2: '{task.symbols[4]}' is {gold[1]}, not {attempt[1]}." in g.feedback
    )
    assert "Position 3" not in g.feedback


def test_wrong_length_reports_missing_positions(task):
    e = example_for(task, task.symbols[:3])
    gold = e.reference["answer"]
    g = task.grade(e, gold[:2])
    assert not g.correct and g.score == pytest.approx(2 / 3)
    assert "It has 2 digits; the message has 3 letters." in g.feedback
    assert f"Position 3: '{task.symbols[2]}' is {gold[2]}, missing." in g.feedback
    g = task.grade(e, gold + "1")
    assert not g.correct and g.score == 1.0 and "It has 4 digits" in g.feedback


def test_bad_format_and_empty(task):
    e = example_for(task, task.symbols[:3])
    g = task.grade(e, "the answer is 123")
    assert (g.reward, g.correct, g.score, g.answer) == (0.0, False, 0.0, None)
    assert "is not a number" in g.feedback
    assert g.feedback.endswith(f"The correct answer is {e.reference['answer']}.")
    plain = grade_code(
        e.reference["symbols"], e.reference["answer"], "the answer is 123", "wrong"
    )
    assert e.reference["answer"] not in plain.feedback
    g = task.grade(e, "")
    assert (g.reward, g.correct, g.answer) == (0.0, False, None)
    assert g.feedback.startswith("Your answer is empty.")
    assert task.grade(e, "   ").feedback.startswith("Your answer is empty.")


# ---------------------------------------------------------------- warm-start examples


def test_warm_start_examples_are_teacher_contexts_from_the_default_templates(task):
    cfg = RepromptConfig()
    examples = task.warm_start_examples(400, random.Random(0))
    assert examples == task.warm_start_examples(400, random.Random(0))  # deterministic
    train_prompts = {e.messages[-1]["content"] for e in task.load("train")}
    test_prompts = {e.messages[-1]["content"] for e in task.load("test")}
    kinds = {"plain": 0, "solution": 0, "feedback": 0}
    for messages, target in examples:
        text = messages[-1]["content"]
        prompt = text.split("\n", 1)[0]
        assert (
            prompt in train_prompts and prompt not in test_prompts
        )  # held-out prompts stay unseen
        assert target.isdigit() and len(target) == 3
        if text == prompt:
            kinds["plain"] += 1
            symbols = prompt.rsplit(":", 1)[1].split()
            for s, d in zip(symbols, target):
                if s in task.known:
                    assert d == task.code[s]  # the partial knowledge is the real code
            continue
        assert text.endswith("\n\nCorrectly solve the original question.")
        if cfg.solution_template.split("{")[0] in text:
            kinds["solution"] += 1
            assert text == cfg.reprompt_template.format(
                prompt=prompt,
                solution=cfg.solution_template.format(
                    successful_previous_attempt=target
                ),
                feedback="",
            )
        else:
            kinds["feedback"] += 1
            assert cfg.feedback_template.split("{")[0] in text
    assert all(n > 50 for n in kinds.values()), kinds
    assert not task.warm_start_examples(50, random.Random(0), context_fraction=0.0)[0][
        0
    ][-1]["content"].endswith("question.")


def test_plain_warm_start_examples_never_teach_the_unknown_letters(task):
    """The unknown letters' digits are uniform noise: the student cannot learn their code there."""
    unknown = [s for s in task.symbols if s not in task.known]
    counts = {s: {} for s in unknown}
    for messages, target in task.warm_start_examples(
        3000, random.Random(1), context_fraction=0.0
    ):
        symbols = messages[-1]["content"].rsplit(":", 1)[1].split()
        for s, d in zip(symbols, target):
            if s in counts:
                counts[s][d] = counts[s].get(d, 0) + 1
    for s in unknown:
        total = sum(counts[s].values())
        assert total > 300
        assert (
            counts[s].get(task.code[s], 0) / total < 0.2
        )  # ≈ 1/10, not the secret digit
