r"""The math task and its grading: the student's answer is the content of the last ``\boxed{...}``
(or ``\fbox{...}``); it is correct if its normalised string equals the reference's or if
math-verify says so (under a wall-clock limit, :mod:`.verify`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distil_ray.tasks.base import Grade, TaskExample, resolve_config
from distil_ray.tasks.math.answers import last_boxed, normalize_answer
from distil_ray.tasks.math.config import MathConfig, source_list
from distil_ray.tasks.math.data import (
    available_sources,
    examples_from_file,
    examples_from_hub,
    local_file,
    to_example,
)
from distil_ray.tasks.math.verify import answers_match

NO_ANSWER_FEEDBACK = "No final answer found: put your final answer within \\boxed{}."


def grade_boxed(gold: str, response: str, *, timeout_s: float = 10.0, isolation: str = "process",
                reveal_answer: bool = False) -> Grade:
    """Grade the last boxed answer of ``response`` against the reference answer ``gold``."""
    pred = last_boxed(response)
    if pred is None or not pred.strip():
        feedback = NO_ANSWER_FEEDBACK
        if reveal_answer:
            feedback += f" The correct answer is {gold}."
        return Grade(0.0, False, 0.0, feedback, answer=None, details={"extracted": pred, "method": None})
    pred = pred.strip()
    correct, details = answers_match(gold, pred, timeout_s=timeout_s, isolation=isolation)
    if correct:
        feedback = f"Your final answer {pred} is correct."
    else:
        feedback = f"Your final answer {pred} is incorrect."
        if reveal_answer:
            feedback += f" The correct answer is {gold}."
    reward = 1.0 if correct else 0.0
    details["extracted"] = pred
    return Grade(reward, correct, reward, feedback, answer=normalize_answer(pred), details=details)


class MathTask:
    r"""Boxed-answer math. ``load(split)``: ``"train"``, ``"test"`` or a source name.

    The options are :class:`MathConfig`'s: ``train`` / ``test``: source names loaded for those
    splits. ``data_dir``: folder with ``{source}/test.jsonl`` (or ``train.jsonl``). ``files``:
    extra sources as ``{name: path}`` (JSON lines, any supported schema). ``hub``: overrides /
    additions to :data:`HUB_SOURCES`. ``timeout_s`` / ``isolation``: the math-verify time limit
    (see :func:`answers_match`). ``reveal_answer=True`` adds the reference answer to the feedback
    of wrong answers.
    """

    name = "math"
    config_class = MathConfig

    def __init__(self, cfg: MathConfig | None = None):
        self.cfg = resolve_config(MathConfig, cfg, self.name)
        self.splits = {"train": source_list(self.cfg.train), "test": source_list(self.cfg.test)}
        self.data_dir = self.cfg.data_path()
        self.files = {k: Path(v) for k, v in (self.cfg.files or {}).items()}
        self.hub = self.cfg.hub_sources()

    def sources(self) -> list[str]:
        return available_sources(self.files, self.hub, self.data_dir)

    # -- loading ----------------------------------------------------------------------------

    def load(self, split: str) -> list[TaskExample]:
        if split in self.splits:
            return [ex for source in self.splits[split] for ex in self.load_source(source, split)]
        if split in self.sources():
            return self.load_source(split, split)
        raise ValueError(
            f"unknown math split {split!r}; valid: 'train', 'test' or a source ({', '.join(self.sources())})"
        )

    def load_source(self, source: str, split: str) -> list[TaskExample]:
        path = local_file(source, self.files, self.data_dir)
        if path is not None:
            return self.load_file(path, source, split)
        if source not in self.hub:
            raise FileNotFoundError(
                f"math source {source!r} has no local file (data_dir={self.data_dir}) and no hub name"
            )
        return examples_from_hub(self.hub[source], lambda rec, i: self.to_example(rec, source, split, index=i))

    def load_file(self, path: str | Path, source: str, split: str = "test") -> list[TaskExample]:
        """Examples from a JSON-lines or Parquet file of any supported schema (errors name file and line)."""
        return examples_from_file(path, lambda rec, i: self.to_example(rec, source, split, index=i))

    def to_example(self, record: Mapping[str, Any], source: str, split: str, index: int) -> TaskExample:
        return to_example(record, source, split, index, instruction=self.cfg.instruction,
                          system_prompt=self.cfg.system_prompt, task=self.name,
                          prefix=self.cfg.train_prefix if split == "train" else "")

    # -- grading ----------------------------------------------------------------------------

    def grade(self, example: TaskExample, response: str) -> Grade:
        c = self.cfg
        return grade_boxed(example.reference["answer"], response, timeout_s=float(c.timeout_s),
                           isolation=c.isolation, reveal_answer=c.reveal_answer)
