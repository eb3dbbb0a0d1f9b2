"""Samples a user can read: validation generations and training rollouts as JSON lines.

``logging.log_generations=N`` writes the first N validation samples of each evaluation to
``RUN_DIR/generations/step_NNNNNN.jsonl`` (and a wandb table); ``logging.rollout_dump=true``
writes every training batch's records to ``RUN_DIR/rollouts/step_NNNNNN.jsonl``, from a Ray task
next to the records, so the driver still never fetches them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import ray

COLUMNS = ("step", "prompt_uid", "sample_index", "policy_version", "prompt", "response", "reward", "correct",
           "score", "answer", "feedback", "teacher_context", "distilled")


def sample_row(step: int, record, tokenizer, teacher_context_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """One record (Graded or Scored) as a row: the chat-templated prompt and the teacher's
    context as the models saw them (special tokens kept), the response as graded."""
    teacher_ids = teacher_context_ids
    if teacher_ids is None and len(getattr(record, "teacher_prompt_ids", ())):
        teacher_ids = record.teacher_prompt_ids
    return {
        "step": int(step),
        "prompt_uid": record.prompt_uid,
        "sample_index": int(record.sample_index),
        "policy_version": int(record.policy_version),
        "prompt": tokenizer.decode(list(map(int, record.prompt_ids)), skip_special_tokens=False),
        "response": record.text,
        "reward": float(record.reward),
        "correct": bool(record.correct),
        "score": float(record.score),
        "answer": record.answer,
        "feedback": record.feedback,
        "teacher_context": None if teacher_ids is None or not len(teacher_ids)
        else tokenizer.decode(list(map(int, teacher_ids)), skip_special_tokens=False),
        "distilled": bool(getattr(record, "distill_mask", False)),
    }


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, path)


@ray.remote(num_cpus=0)
def dump_rollouts(path: str, tokenizer, step: int, *groups) -> int:
    """Write every record of ``groups`` (each a list of Scored; refs resolved here) to ``path``."""
    rows = [sample_row(step, r, tokenizer) for group in groups for r in group]
    write_rows(Path(path), rows)
    return len(rows)
