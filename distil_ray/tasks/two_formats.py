"""A task where future credit matters: the answer has two formats, and feedback teaches only one.

The prompt is four letters ("Encode in format A or B: b q f x"); the response is a format letter,
then one digit per letter ("A7291"). Reward 1 for an exact answer in *either* format: format A
follows one secret letter → digit code, format B a second code. The feedback states the format-A
code ("Your answer is wrong. The format-A code is 7291.") and nothing about format B, whatever the
response was — so it never says which format the student chose.

What the feedback-conditioned teacher (the same model, the feedback in its context) then does:

* at the **format letter** it is indifferent: the feedback is the same after either choice, and the
  warm start taught it that the format is a free choice (50/50);
* after **A** it states the code (it copies the digits out of the feedback);
* after **B** it knows nothing it did not know before (the known letters, a guess elsewhere).

A purely local learner (CE, SDPO's divergence, token by token) copies the teacher everywhere: the
50/50 format split included, so half its rollouts stay in format B, where the teacher is as unsure
as the student and the cross-entropy cannot fall. DistIL's future-credit term charges the format
letter with the cross-entropy the rest of the answer then incurs — falling after A as the code is
learned, stuck after B — and moves the student to A. (With λ = 1, once the A code is learned,
the optimum of ``CE(format) + (1 − q)·L_B`` over the share q of A, with the teacher's 50/50 at the
format letter and L_B ≈ 5.5 nats of later cross-entropy after a B (six unknown letters of ten),
is q ≈ 0.92: ``0.5/(1 − q) − 0.5/q = L_B``.)

Two things would give the format away and make the task easy for every learner, so the experiment
avoids the first (``conf/experiment/claims.yaml``): a successful sibling's answer in the teacher's
context (it starts with the format letter: the experiment uses feedback-only contexts). OPSD's
context is a reference solution, a format-A answer; the warm start teaches the format letter as a
free choice there too, so OPSD's teacher is as indifferent at the format as the feedback teacher
and OPSD is one more local learner on this task.

The warm start (``warm_start_examples``) gives the tiny model what a pretrained LLM would bring: the
answer format with the format letter drawn 50/50, ``num_known`` letters of both codes, reading
the format-A code out of the feedback (and out of a reference solution) after an A — in those
examples the stated digits are fresh random ones, so the context is the only way to be right —
and, after a B, nothing beyond the student's own knowledge.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distil_ray.feedback.templates import RepromptConfig, reference_solution_context, reprompt_group
from distil_ray.tasks.base import Grade, TaskExample, resolve_config
from distil_ray.tasks.toy import DIGITS, LETTERS, secret_code_digits

__all__ = ["FORMATS", "TwoFormatsConfig", "TwoFormatsTask"]

FORMATS = ("A", "B")
PROMPT_PREFIX = "Encode in format A or B:"
SPLITS = ("train", "test")

# A format letter then digits; the letter and each digit are single tokens of the tiny tokenizer
# (the pre-tokenizer splits letters from digits and digits one by one).
_ANSWER = re.compile(r"\s*([AB])(\d+)\s*")


@dataclass(frozen=True)
class TwoFormatsConfig:
    """The task's options (``task.kwargs`` of ``task=two_formats``); see :class:`TwoFormatsTask`."""

    seed: int = 0
    num_symbols: int = 10
    length: int = 4
    test_size: int = 128
    train_size: int | None = None
    num_known: int = 4  # letters whose code (in both formats) the warm start teaches
    # share of the warm start's context examples that use OPSD's reference-solution context (the
    # rest are feedback contexts), so that algorithm=opsd has a teacher that can read it: with 0.25
    # the tiny model never learned to copy from the middle of that longer context (greedy teacher
    # accuracy 0.00 on the test prompts; 1.00 with 0.5, feedback contexts 0.99 either way)
    reference_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 2 <= self.num_symbols <= len(LETTERS):
            raise ValueError(f"num_symbols={self.num_symbols}: must lie in [2, {len(LETTERS)}]")
        if not 1 <= self.length <= 8:
            raise ValueError(f"length={self.length}: must lie in [1, 8]")
        if not 0 <= self.num_known <= self.num_symbols:
            raise ValueError(f"num_known={self.num_known}: must lie in [0, num_symbols={self.num_symbols}]")
        n = self.num_symbols**self.length
        if not 1 <= self.test_size < n:
            raise ValueError(f"test_size={self.test_size}: must lie in [1, {n - 1}] ({n} distinct prompts)")
        if self.train_size is not None and not 1 <= self.train_size <= n - self.test_size:
            raise ValueError(f"train_size={self.train_size}: must lie in [1, {n - self.test_size}] "
                             "(prompts left after the test split)")
        if not 0.0 <= self.reference_fraction <= 1.0:
            raise ValueError(f"reference_fraction={self.reference_fraction}: must lie in [0, 1]")


class TwoFormatsTask:
    """The two-formats task: ``num_symbols`` letters, prompts of ``length`` letters, two seeded
    codes (format B's digit differs from format A's for every letter), disjoint seeded splits."""

    name = "two_formats"
    config_class = TwoFormatsConfig

    def __init__(self, cfg: TwoFormatsConfig | None = None):
        self.cfg = cfg = resolve_config(TwoFormatsConfig, cfg, self.name)
        rng = random.Random(f"two-formats-code-{cfg.seed}")
        self.symbols, digits = secret_code_digits(rng, cfg.num_symbols)
        shift = rng.randrange(1, 10)  # B's digit is never A's: the two answers differ everywhere
        self.codes: dict[str, dict[str, str]] = {
            "A": dict(zip(self.symbols, digits)),
            "B": {s: str((int(d) + shift) % 10) for s, d in zip(self.symbols, digits)},
        }
        self.known: frozenset[str] = frozenset(rng.sample(self.symbols, cfg.num_known))
        strings = [()]
        for _ in range(cfg.length):
            strings = [s + (c,) for s in strings for c in self.symbols]
        random.Random(f"two-formats-split-{cfg.seed}").shuffle(strings)
        rest = strings[cfg.test_size:]
        self._splits = {
            "test": strings[: cfg.test_size],
            "train": rest if cfg.train_size is None else rest[: cfg.train_size],
        }

    # Bump when warm_start_examples changes in a way the options do not show: the warm-start cache
    # is keyed by config(), so a stale warm start is never reused.
    EXAMPLES_VERSION = 3

    def config(self) -> dict[str, Any]:
        """Everything that defines the task (what a warm-start cache is keyed by)."""
        return {"name": self.name, "examples_version": self.EXAMPLES_VERSION, **dataclasses.asdict(self.cfg)}

    # -- examples ------------------------------------------------------------------------------

    @staticmethod
    def prompt_text(symbols: Sequence[str]) -> str:
        return f"{PROMPT_PREFIX} {' '.join(symbols)}"

    def answer(self, symbols: Sequence[str], fmt: str) -> str:
        """The correct answer in format ``fmt``: the letter, then the code of every symbol."""
        return fmt + "".join(self.codes[fmt][s] for s in symbols)

    def make_example(self, symbols: Sequence[str], split: str) -> TaskExample:
        symbols = tuple(symbols)
        unknown = [s for s in symbols if s not in self.codes["A"]]
        if unknown:
            raise ValueError(f"symbols {unknown} are not in this task's alphabet {self.symbols}")
        answers = {fmt: self.answer(symbols, fmt) for fmt in FORMATS}
        return TaskExample(
            uid=f"two_formats/{split}/{''.join(symbols)}",
            task=self.name,
            messages=[{"role": "user", "content": self.prompt_text(symbols)}],
            # OPSD's teacher sees "solution": a format-A answer (the one the feedback teaches)
            reference={"symbols": list(symbols), "answers": answers, "solution": answers["A"]},
            meta={"split": split},
        )

    def load(self, split: str) -> list[TaskExample]:
        if split not in self._splits:
            raise ValueError(f"unknown split {split!r} for task 'two_formats'; valid splits: {', '.join(SPLITS)}")
        return [self.make_example(s, split) for s in self._splits[split]]

    # -- grading -------------------------------------------------------------------------------

    def feedback_text(self, verdict: str, code_a: str) -> str:
        """What the feedback source says: a verdict, then the format-A code — the same after
        either format, so the feedback never reveals which one the student chose."""
        return f"{verdict} The format-A code is {code_a}."

    def grade(self, example: TaskExample, response: str) -> Grade:
        answers = example.reference["answers"]
        code_a = answers["A"][1:]
        match = _ANSWER.fullmatch(response)
        if match is None:
            verdict = f"Your answer is not a format letter (A or B) followed by {self.cfg.length} digits."
            return Grade(0.0, False, 0.0, self.feedback_text(verdict, code_a), answer=None,
                         details={"format": None, "format_ok": False})
        fmt, digits = match.groups()
        truth = answers[fmt][1:]
        correct = digits == truth
        right = sum(1 for i, d in enumerate(truth) if i < len(digits) and digits[i] == d)
        verdict = "Your answer is correct." if correct else "Your answer is wrong."
        return Grade(float(correct), correct, right / len(truth), self.feedback_text(verdict, code_a),
                     answer=fmt + digits, details={"format": fmt, "format_ok": True})

    def eval_metrics(self, grades: Sequence[Sequence[Any]]) -> dict[str, float]:
        """The share of validation answers in each format (and malformed): where a learner's format
        choice went — what separates future credit from local credit on this task."""
        answers = [g.answer for group in grades for g in group]
        n = max(1, len(answers))
        return {
            "format_a": sum(1 for a in answers if a and a[0] == "A") / n,
            "format_b": sum(1 for a in answers if a and a[0] == "B") / n,
            "malformed": sum(1 for a in answers if not a) / n,
        }

    # -- warm start ----------------------------------------------------------------------------

    def _guess(self, symbols: Sequence[str], fmt: str, rng: random.Random) -> str:
        """What the warm-started model knows in format ``fmt``: the known letters, a guess elsewhere."""
        return "".join(self.codes[fmt][s] if s in self.known else rng.choice(DIGITS) for s in symbols)

    def warm_start_examples(
        self,
        n: int,
        rng: random.Random,
        *,
        context_fraction: float = 0.5,
        reprompt: RepromptConfig | None = None,
    ) -> list[tuple[list[dict[str, str]], str]]:
        """``n`` supervised ``(messages, target_text)`` pairs over training prompts.

        Every target's format letter is drawn 50/50, independently of the context. A plain prompt's
        digits are what the model knows (``_guess``). The ``context_fraction`` of teacher contexts
        state fresh random "format-A" digits — in the feedback of a simulated attempt, built by
        ``reprompt_group`` as training builds it, or (``reference_fraction`` of them) as a format-A
        reference solution in OPSD's context — and a target in format A copies them; one in format
        B is the plain guess, because the context says nothing about B.
        """
        if not 0.0 <= context_fraction <= 1.0:
            raise ValueError(f"context_fraction={context_fraction}: must lie in [0, 1]")
        reprompt = reprompt or RepromptConfig()
        train = self._splits["train"]
        out = []
        for _ in range(n):
            symbols = train[rng.randrange(len(train))]
            messages = [{"role": "user", "content": self.prompt_text(symbols)}]
            fmt = rng.choice(FORMATS)
            if rng.random() >= context_fraction:
                out.append((messages, fmt + self._guess(symbols, fmt, rng)))
                continue
            stated = "".join(rng.choice(DIGITS) for _ in symbols)
            target = "A" + stated if fmt == "A" else "B" + self._guess(symbols, "B", rng)
            if rng.random() < self.cfg.reference_fraction:
                # the format letter stays a free choice here too: with the reference's own letter
                # as the target (and half the contexts references) the tiny model learned to copy
                # references but no longer the feedback (greedy teacher accuracy on feedback
                # contexts 0.15, against 0.99 this way)
                context = reference_solution_context(messages, "A" + stated)
            else:
                attempt_fmt = rng.choice(FORMATS)
                attempt = attempt_fmt + (stated if rng.random() < 0.2 else self._guess(symbols, attempt_fmt, rng))
                correct = attempt == "A" + stated
                verdict = "Your answer is correct." if correct else "Your answer is wrong."
                context = reprompt_group(messages, [attempt], [float(correct)],
                                         [self.feedback_text(verdict, stated)], reprompt)[0]
            out.append((context.messages or messages, target))
        return out

    def tokenizer_corpus(self, n: int = 200, seed: int = 0) -> tuple[str, ...]:
        """Lines of this task's text (prompts, teacher contexts, answers) for the tiny tokenizer."""
        rng = random.Random(seed)
        return tuple(m[-1]["content"] + " " + t for m, t in self.warm_start_examples(n, rng, context_fraction=0.8))
