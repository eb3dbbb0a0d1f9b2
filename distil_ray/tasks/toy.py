"""A toy task a tiny model learns on a CPU in minutes: encode letters with a secret digit code.

The prompt is a short message of letters ("Encode with the secret code: b q f"); the answer is one
digit per letter ("729"). The code is a fixed hidden map letter → digit drawn from ``seed``. It is
knowledge the model must acquire, and it generalises: the training and test prompts are disjoint
letter strings over the same letters, so whatever the model learns about a letter on training
prompts shows on held-out ones.

The feedback is *rich*: where the reward says only "wrong", the feedback says which positions are
wrong, what they should be, and the corrected answer ("Your answer 759 is wrong at position 2.
Position 2: 'q' is 2, not 5. The correct answer is 729."). A model that can read the feedback in
its context (the self-teacher) answers far better than the same model without it (the student),
which is exactly the gap DistIL distils. (``feedback_style="wrong"`` leaves the corrected answer
out; in the warm starts tried, a tiny model did not learn to use the per-position notes alone.)

A pretrained LLM arrives knowing the answer format, part of the knowledge and how to use feedback;
the tiny model gets that from a short supervised warm start (``warm_start_examples``): the code of
``num_known`` letters (a seeded subset), noise for the others, and examples whose user turn is the
teacher context ``reprompt_group`` builds (a sibling's solution or this task's feedback) with the
answer as target. In those context-reading examples every digit is drawn afresh, so the warm start
teaches *reading* the context, never the hidden code of the unknown letters.

The tiny model for it is ``toy_model_config()``: ``TOY_MODEL_SHAPE`` with a tokenizer that has also
seen the task's text (about half the tokens per teacher context, which made copying from the
context learnable in a short warm start).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from typing import Any

from distil_ray.feedback.templates import RepromptConfig, reprompt_group
from distil_ray.models.tiny import TinyModelConfig
from distil_ray.config import check_choice
from distil_ray.tasks.base import Grade, TaskExample, resolve_config

__all__ = [
    "FEEDBACK_STYLES",
    "LETTERS",
    "SPLITS",
    "TOY_MODEL_SHAPE",
    "ToyConfig",
    "ToyTask",
    "grade_code",
    "toy_model_config",
]

# Letters that the tiny tokenizer (distil_ray.models.tiny) keeps as one token with their leading
# space (" q"): every symbol of a prompt is then exactly one token, whatever the merges of the
# rest of the corpus, so "which letter is at position i" is one token for the model to look at.
LETTERS = "abcdefghijmnopqstwxy"
DIGITS = "0123456789"
SPLITS = ("train", "test")
PROMPT_PREFIX = "Encode with the secret code:"

# The tiny model shape (``TinyModelConfig`` fields) the task is tuned for: four layers give the
# warm start room to learn both the partial code and copying an answer out of the context.
TOY_MODEL_SHAPE = {
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 256,
}


def toy_model_config(task: ToyTask | None = None, **overrides) -> TinyModelConfig:
    """The tiny model the task is tuned for: ``TOY_MODEL_SHAPE`` and a tokenizer that has also
    seen the task's text (``ToyTask.tokenizer_corpus``)."""
    task = task or ToyTask()
    return TinyModelConfig(
        **{**TOY_MODEL_SHAPE, "extra_corpus": task.tokenizer_corpus(), **overrides}
    )


_DIGITS_ONLY = re.compile(r"\s*(\d+)\s*")


def secret_code_digits(rng: random.Random, num_symbols: int) -> tuple[list[str], list[str]]:
    """``num_symbols`` letters of :data:`LETTERS` and a digit for each, drawn from ``rng``: a
    permutation of the digits per ten letters, so with up to ten letters no two share a digit."""
    symbols = rng.sample(LETTERS, num_symbols)
    digits: list[str] = []
    while len(digits) < num_symbols:
        digits += rng.sample(DIGITS, len(DIGITS))
    return symbols, digits


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass(frozen=True)
class ToyConfig:
    """The toy task's options (``task.kwargs`` of ``task=toy``); see :class:`ToyTask`."""

    seed: int = 0
    num_symbols: int = 10
    min_length: int = 3
    max_length: int = 3
    test_size: int = 128
    train_size: int | None = None
    num_known: int = 6
    feedback_style: str = "corrected"

    def __post_init__(self) -> None:
        if not 2 <= self.num_symbols <= len(LETTERS):
            raise ValueError(
                f"num_symbols={self.num_symbols}: must lie in [2, {len(LETTERS)}]"
            )
        if not 1 <= self.min_length <= self.max_length <= 8:
            raise ValueError(
                f"min_length={self.min_length}, max_length={self.max_length}: need 1 <= min <= max <= 8"
            )
        if not 0 <= self.num_known <= self.num_symbols:
            raise ValueError(
                f"num_known={self.num_known}: must lie in [0, num_symbols={self.num_symbols}]"
            )
        n_strings = self.n_prompts()
        if self.test_size < 1 or self.test_size >= n_strings:
            raise ValueError(
                f"test_size={self.test_size}: must lie in [1, {n_strings - 1}] ({n_strings} distinct prompts)"
            )
        if self.train_size is not None and not 1 <= self.train_size <= n_strings - self.test_size:
            raise ValueError(
                f"train_size={self.train_size}: must lie in [1, {n_strings - self.test_size}] "
                "(prompts left after the test split)"
            )
        check_choice("feedback_style", self.feedback_style, FEEDBACK_STYLES)

    def n_prompts(self) -> int:
        """How many distinct prompt strings there are."""
        return sum(self.num_symbols**n for n in range(self.min_length, self.max_length + 1))


class ToyTask:
    """The secret-code task.

    ``num_symbols`` letters of :data:`LETTERS` (chosen by ``seed``), each mapped to a digit by a
    seeded permutation (so with 10 symbols every digit is used once); prompts have ``min_length`` to
    ``max_length`` letters. ``test_size`` distinct prompt strings form the test split, ``train_size``
    others (default: all the remaining ones) the training split. ``num_known`` is the number of
    letters whose code the warm start teaches. (All of them fields of :class:`ToyConfig`.)
    """

    name = "toy"
    config_class = ToyConfig

    def __init__(self, cfg: ToyConfig | None = None):
        self.cfg = cfg = resolve_config(ToyConfig, cfg, self.name)
        rng = random.Random(f"toy-code-{cfg.seed}")
        self.symbols, digits = secret_code_digits(rng, cfg.num_symbols)
        self.code: dict[str, str] = dict(zip(self.symbols, digits))
        # The warm start's partial knowledge: a seeded subset, not the first letters of the alphabet.
        self.known: frozenset[str] = frozenset(rng.sample(self.symbols, cfg.num_known))

        strings = self._all_strings()
        random.Random(f"toy-split-{cfg.seed}").shuffle(strings)
        test = strings[: cfg.test_size]
        rest = strings[cfg.test_size :]
        self._splits = {
            "test": test,
            "train": rest if cfg.train_size is None else rest[: cfg.train_size],
        }

    def config(self) -> dict[str, Any]:
        """Everything that defines the task (what a warm-start cache is keyed by)."""
        return {"name": self.name, **dataclasses.asdict(self.cfg)}

    def _all_strings(self) -> list[tuple[str, ...]]:
        out: list[tuple[str, ...]] = [()]
        strings = []
        for length in range(1, self.cfg.max_length + 1):
            out = [s + (c,) for s in out for c in self.symbols]
            if length >= self.cfg.min_length:
                strings += out
        return strings

    def tokenizer_corpus(self, n: int = 200, seed: int = 0) -> tuple[str, ...]:
        """Lines of this task's text (prompts, teacher contexts, feedback) for
        ``TinyModelConfig(extra_corpus=...)``: the BPE then merges its words, and every prompt and
        teacher context is a few times fewer tokens (faster, and easier to attend over)."""
        rng = random.Random(seed)
        return tuple(
            m[-1]["content"] + " " + t
            for m, t in self.warm_start_examples(n, rng, context_fraction=0.8)
        )

    # -- examples ------------------------------------------------------------------------------

    @staticmethod
    def prompt_text(symbols: Sequence[str]) -> str:
        return f"{PROMPT_PREFIX} {' '.join(symbols)}"

    def encode(self, symbols: Sequence[str]) -> str:
        return "".join(self.code[s] for s in symbols)

    def make_example(self, symbols: Sequence[str], split: str) -> TaskExample:
        symbols = tuple(symbols)
        unknown = [s for s in symbols if s not in self.code]
        if unknown:
            raise ValueError(
                f"symbols {unknown} are not in this task's alphabet {self.symbols}"
            )
        return TaskExample(
            uid=f"toy/{split}/{''.join(symbols)}",
            task=self.name,
            messages=[{"role": "user", "content": self.prompt_text(symbols)}],
            reference={"symbols": list(symbols), "answer": self.encode(symbols)},
            meta={"split": split, "length": len(symbols)},
        )

    def load(self, split: str) -> list[TaskExample]:
        if split not in self._splits:
            raise ValueError(
                f"unknown split {split!r} for task 'toy'; valid splits: {', '.join(SPLITS)}"
            )
        return [self.make_example(s, split) for s in self._splits[split]]

    # -- grading -------------------------------------------------------------------------------

    def grade(self, example: TaskExample, response: str) -> Grade:
        return grade_code(
            example.reference["symbols"],
            example.reference["answer"],
            response,
            self.cfg.feedback_style,
        )

    # -- warm start ----------------------------------------------------------------------------

    def warm_start_examples(
        self,
        n: int,
        rng: random.Random,
        *,
        context_fraction: float = 0.5,
        reprompt: RepromptConfig | None = None,
    ) -> list[tuple[list[dict[str, str]], str]]:
        """``n`` supervised ``(messages, target_text)`` pairs over training prompts.

        ``1 - context_fraction`` of them are plain prompts: the known letters' true code, a fresh
        random digit for each unknown letter (the model learns that it does not know those: its
        distribution over their digit stays flat). The rest are teacher contexts built by
        ``reprompt_group`` exactly as in training — half with a successful sibling's answer, half
        with this task's feedback on a simulated earlier attempt (a quarter of those right) — whose
        target is the answer the context states. There every digit is a fresh random one,
        consistent between context and target, so the only way to be right is to read the context.
        """
        if not 0.0 <= context_fraction <= 1.0:
            raise ValueError(f"context_fraction={context_fraction}: must lie in [0, 1]")
        reprompt = reprompt or RepromptConfig()
        train = self._splits["train"]
        out = []
        for _ in range(n):
            symbols = train[rng.randrange(len(train))]
            messages = [{"role": "user", "content": self.prompt_text(symbols)}]
            if rng.random() >= context_fraction:
                # the real code where the warm start knows it, a fresh guess elsewhere
                truth = "".join(
                    self.code[s] if s in self.known else rng.choice(DIGITS)
                    for s in symbols
                )
                out.append((messages, truth))
                continue
            # A context example's truth is random for every letter, known ones included: the
            # context is then the only way to be right, which is what makes the (slow to form)
            # copying circuit the thing the loss pays for.
            truth = "".join(rng.choice(DIGITS) for _ in symbols)
            if rng.random() < 0.5:
                # a sibling succeeded: the teacher sees its answer
                attempt, sibling = self._simulated_attempt(symbols, truth, rng), truth
                grades = [
                    grade_code(symbols, truth, attempt, self.cfg.feedback_style),
                    grade_code(symbols, truth, sibling, self.cfg.feedback_style),
                ]
                responses = [attempt, sibling]
            else:
                # no sibling succeeded: the teacher sees the feedback on this attempt — a quarter
                # of them right ("Your answer 729 is correct."), as a lone success is in training
                attempt = (
                    truth
                    if rng.random() < 0.25
                    else self._simulated_attempt(symbols, truth, rng)
                )
                grades, responses = (
                    [grade_code(symbols, truth, attempt, self.cfg.feedback_style)],
                    [attempt],
                )
            context = reprompt_group(
                messages,
                responses,
                [g.reward for g in grades],
                [g.feedback for g in grades],
                reprompt,
            )[0]
            if (
                context.messages is None
            ):  # cannot happen with feedback on every attempt; be safe
                out.append((messages, truth))
            else:
                out.append((context.messages, truth))
        return out

    def _simulated_attempt(
        self, symbols: Sequence[str], truth: str, rng: random.Random
    ) -> str:
        """A student-like attempt: mostly right on known letters, a guess on the others, sometimes
        malformed (too short, too long, empty or not digits), so every kind of feedback is seen."""
        u = rng.random()
        if u < 0.03:
            return ""
        if u < 0.06:
            return rng.choice(["?", "no idea", "abc", "x y"])
        digits = [
            t if symbols[i] in self.known and rng.random() < 0.8 else rng.choice(DIGITS)
            for i, t in enumerate(truth)
        ]
        if u < 0.10 and len(digits) > 1:
            digits = digits[: rng.randrange(1, len(digits))]
        elif u < 0.14:
            digits += [rng.choice(DIGITS) for _ in range(rng.randint(1, 2))]
        return "".join(digits)


FEEDBACK_STYLES = ("corrected", "wrong")


def grade_code(
    symbols: Sequence[str],
    answer: str,
    response: str,
    feedback_style: str = "corrected",
) -> Grade:
    """Grade ``response`` against ``answer`` (one digit per symbol), with position-level feedback.

    Reward 1 only for exactly the answer (surrounding whitespace allowed); the score is the
    fraction of positions right. The feedback of a wrong answer says which positions are wrong,
    with the letter there and its digit ("Position 2: 'q' is 2, not 5."); ``"corrected"`` (the
    default) ends with the corrected answer ("The correct answer is 729."). Either way it carries
    what the reward bit does not. The corrected answer, always last, sits at a fixed distance from
    the end of the teacher's context — reading it is the same skill as reading a successful
    sibling's answer, which a tiny model learns in a few hundred warm-start steps; finding the
    notes of the wrong positions by letter is a harder skill for it. A response that is not a
    string of digits gets a format message (and, with ``"corrected"``, the corrected answer).
    """
    check_choice("feedback_style", feedback_style, FEEDBACK_STYLES)
    symbols = list(symbols)
    n = len(symbols)
    match = _DIGITS_ONLY.fullmatch(response)
    if match is None:
        shown = response.strip()
        if not shown:
            feedback = f"Your answer is empty. Write {_plural(n, 'digit')}, one per letter, and nothing else."
        else:
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            feedback = f"Your answer {shown!r} is not a number. Write {_plural(n, 'digit')}, one per letter, and nothing else."
        if feedback_style == "corrected":
            feedback += f" The correct answer is {answer}."
        return Grade(
            0.0,
            False,
            0.0,
            feedback,
            answer=None,
            details={"format_ok": False, "wrong_positions": []},
        )

    digits = match.group(1)
    if digits == answer:
        return Grade(
            1.0,
            True,
            1.0,
            f"Your answer {digits} is correct.",
            answer=digits,
            details={"format_ok": True, "wrong_positions": []},
        )
    wrong = [
        i + 1 for i, gold in enumerate(answer) if i >= len(digits) or digits[i] != gold
    ]
    where = (
        ", ".join(map(str, wrong[:-1]))
        + (" and " if len(wrong) > 1 else "")
        + str(wrong[-1])
        if wrong
        else ""
    )
    parts = [
        f"Your answer {digits} is wrong"
        + (f" at position{'s' if len(wrong) > 1 else ''} {where}." if wrong else ".")
    ]
    if len(digits) != n:
        parts.append(
            f"It has {_plural(len(digits), 'digit')}; the message has {_plural(n, 'letter')}."
        )
    for i, (symbol, gold) in enumerate(zip(symbols, answer)):
        said = digits[i] if i < len(digits) else None
        if said != gold:
            parts.append(
                f"Position {i + 1}: '{symbol}' is {gold}, "
                + (f"not {said}." if said is not None else "missing.")
            )
    if feedback_style == "corrected":
        parts.append(f"The correct answer is {answer}.")
    n_right = sum(
        1 for i, gold in enumerate(answer) if i < len(digits) and digits[i] == gold
    )
    return Grade(
        0.0,
        False,
        n_right / n,
        " ".join(parts),
        answer=digits,
        details={"format_ok": True, "wrong_positions": wrong},
    )
