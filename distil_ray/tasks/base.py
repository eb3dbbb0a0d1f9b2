"""The interface every task plugs in through: examples to prompt with, and a grader.

A task turns dataset records into ``TaskExample``s (what the student sees + reference data it must
never see) and grades a response text into a ``Grade`` (reward for RL, correctness, partial score,
and feedback text for the teacher's context).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, TypeVar


@dataclass
class TaskExample:
    uid: str  # stable across runs: task/split/source id
    task: str  # task name, e.g. "sciknoweval"
    messages: list[dict[str, str]]  # chat messages the student sees (system + user)
    reference: dict[str, Any]  # answer key / tests / reference solution: never in the student's context
    meta: dict[str, Any] = field(default_factory=dict)  # domain, source, difficulty, ... (for per-group metrics)


@dataclass
class Grade:
    reward: float  # scalar reward (what GRPO uses)
    correct: bool  # fully correct
    score: float  # partial credit in [0, 1] (e.g. fraction of tests passed)
    feedback: str  # text for the teacher's context (grader message, failing test, traceback)
    answer: str | None = None  # the extracted final answer (for maj@k); None if none was found
    details: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: str
    # The task's typed configuration section: a plain dataclass whose fields are the task's options,
    # checked in its ``__post_init__`` without loading any data; ``__init__`` takes one instance.
    config_class: type

    def load(self, split: str) -> list[TaskExample]:
        """The examples of a split ("train" / "test" / ...); unknown splits list the valid ones."""

    def grade(self, example: TaskExample, response: str) -> Grade:
        """Grade one response text (the student's decoded output)."""


C = TypeVar("C")


def resolve_config(config_class: type[C], cfg: C | None, task_name: str) -> C:
    """``cfg``, or the defaults of ``config_class`` when it is None; anything else (e.g. the old
    keyword style) is a ``TypeError`` that says what to pass instead."""
    if cfg is None:
        return config_class()
    if not isinstance(cfg, config_class):
        raise TypeError(
            f"task {task_name!r} takes a {config_class.__name__} (or None), not {type(cfg).__name__}: "
            f"pass {config_class.__name__}(...), or use get_task({task_name!r}, **options)"
        )
    return cfg


class DataFormatError(ValueError):
    """A malformed record: the message names the file and the line."""

    def __init__(self, path, line: int, problem: str):
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = path, line, problem


RECORD_SUFFIXES = (".jsonl", ".parquet")


def find_record_file(stem) -> Path | None:
    """``{stem}.jsonl`` or ``{stem}.parquet``, whichever exists (JSON lines first)."""
    for suffix in RECORD_SUFFIXES:
        path = Path(f"{stem}{suffix}")
        if path.is_file():
            return path
    return None


def iter_records(path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(number, record)`` for each record of a JSON-lines or Parquet file; the number is the
    1-based line (JSON lines) or row (Parquet) that a ``DataFormatError`` names."""
    if str(path).endswith(".parquet"):
        import pyarrow.parquet as pq  # installed with `datasets`

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield row, record
        return
    yield from iter_jsonl(path)


def iter_jsonl(path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSON-lines file (1-based).

    A line that is not valid JSON, or not a JSON object, raises ``DataFormatError`` naming the
    file and the line.
    """
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, line_no, f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataFormatError(path, line_no, f"expected a JSON object, got {type(record).__name__}")
            yield line_no, record
