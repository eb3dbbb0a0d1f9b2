"""The SciKnowEval task and SDPO's ``mcq`` grading.

The extracted answer is ``response.split("<answer>")[-1].split("</answer>")[0].strip()`` — the
text between the last ``<answer>`` and the following ``</answer>``; without tags this is the
whole (stripped) response, so a bare ``"B"`` counts, exactly as in SDPO. ``strict_tags=True``
instead requires an ``<answer>`` tag. Reward 1 iff the extracted text equals the answer letter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distil_ray.tasks.base import Grade, TaskExample, resolve_config
from distil_ray.tasks.sciknoweval.config import SciKnowEvalConfig
from distil_ray.tasks.sciknoweval.data import (
    check_split,
    raw_to_processed,
    read_processed,
    read_raw,
    selected_domains,
    to_example,
)


def extract_answer(response: str, strict_tags: bool = False) -> str | None:
    """SDPO's extraction: the stripped text between the last ``<answer>`` and the next ``</answer>``.

    Without an ``<answer>`` tag SDPO takes the whole response (up to a ``</answer>``); with
    ``strict_tags`` that case returns ``None``.
    """
    if strict_tags and "<answer>" not in response:
        return None
    return response.split("<answer>")[-1].split("</answer>")[0].strip()


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def grade_mcq(gold: str, options: Sequence[str], response: str, *, strict_tags: bool = False,
              reveal_answer: bool = False) -> Grade:
    """Grade ``response`` against the answer letter ``gold``, with feedback on what was extracted."""
    has_open, has_close = "<answer>" in response, "</answer>" in response
    extracted = extract_answer(response, strict_tags=strict_tags)
    correct = extracted is not None and extracted == gold
    answer = extracted if extracted else None
    letters = ", ".join(options)

    if correct:
        feedback = f"Your answer {extracted} is correct."
    elif not has_open:
        feedback = (
            "No <answer> tag was found in your response. End it with <answer>\nX\n</answer>, "
            f"where X is one option letter ({letters})."
        )
    elif not extracted:
        feedback = f"Your last <answer> tag is empty. It must contain one option letter ({letters})."
    elif extracted not in options:
        feedback = (
            f"Your last <answer> tag contains {_short(extracted)!r}, which is not an option letter; "
            f"it must contain only one of {letters}."
        )
    else:
        feedback = f"Your answer {extracted} is incorrect."
    if not correct and reveal_answer:
        feedback += f" The correct answer is {gold}."
    if has_open and not has_close and not correct:
        feedback += " (Your last <answer> tag is not closed with </answer>.)"

    reward = 1.0 if correct else 0.0
    return Grade(
        reward=reward,
        correct=correct,
        score=reward,
        feedback=feedback,
        answer=answer,
        details={"extracted": extracted, "has_answer_tag": has_open, "has_closing_tag": has_close},
    )


class SciKnowEvalTask:
    """SciKnowEval L3 MCQ: ``load("train" | "test")`` over the chosen domains; SDPO's grading.

    ``meta["domain"]`` holds the domain (for per-domain metrics). ``reveal_answer=True`` puts the
    correct letter into the feedback of wrong answers (off by default: the feedback then says only
    what was extracted and whether it is right).
    """

    name = "sciknoweval"
    config_class = SciKnowEvalConfig

    def __init__(self, cfg: SciKnowEvalConfig | None = None):
        self.cfg = resolve_config(SciKnowEvalConfig, cfg, self.name)
        self.domains = selected_domains(self.cfg.domains)
        self.data_dir = Path(self.cfg.data_dir) if self.cfg.data_dir is not None else None
        self.raw_path = Path(self.cfg.raw_path) if self.cfg.raw_path is not None else None
        self._raw_cache: list[Mapping[str, Any]] | None = None

    # -- loading ----------------------------------------------------------------------------

    def load(self, split: str) -> list[TaskExample]:
        split = check_split(split)
        examples: list[TaskExample] = []
        for domain in self.domains:
            if self.data_dir is not None:
                records = read_processed(self.data_dir, domain, split)
            else:
                records = raw_to_processed(self._raw_records(), domain, self.cfg.test_size, self.cfg.seed)[split]
            examples += [self.to_example(rec, domain, split) for rec in records]
        return examples

    def _raw_records(self) -> list[Mapping[str, Any]]:
        if self._raw_cache is None:
            self._raw_cache = read_raw(self.raw_path, self.cfg.hub_name)
        return self._raw_cache

    def to_example(self, rec: Mapping[str, Any], domain: str, split: str) -> TaskExample:
        """A processed record (as in the files, or from ``format_raw_record`` plus ``idx``)."""
        return to_example(rec, domain, split, task=self.name)

    # -- grading ----------------------------------------------------------------------------

    def grade(self, example: TaskExample, response: str) -> Grade:
        return grade_mcq(example.reference["answer"], example.reference.get("options") or ["A", "B", "C", "D"],
                         response, strict_tags=self.cfg.strict_tags, reveal_answer=self.cfg.reveal_answer)
