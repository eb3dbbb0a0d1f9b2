"""Math records: where each source comes from (local files or the hub, :data:`HUB_SOURCES`), the
record schemas normalised by :func:`normalize_record`, and record → :class:`TaskExample`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distil_ray.tasks.base import DataFormatError, TaskExample, find_record_file, iter_records
from distil_ray.tasks.math.answers import answer_to_str, last_boxed, normalize_answer
from distil_ray.tasks.math.prompts import build_messages


@dataclass(frozen=True)
class HubSource:
    name: str  # hub dataset name
    split: str = "test"
    config: str | None = None


# Sources distributed as local files (``{data_dir}/{name}/test.jsonl``).
LOCAL_SOURCES = ("aime24", "amc23", "minerva_math")

HUB_SOURCES: dict[str, HubSource] = {
    "aime24": HubSource("math-ai/aime24", "test"),
    "aime25": HubSource("MathArena/aime_2025", "train"),
    "hmmt25": HubSource("MathArena/hmmt_feb_2025", "train"),
    "amc23": HubSource("math-ai/amc23", "test"),
    "minerva_math": HubSource("math-ai/minervamath", "test"),
    # OPSD's training set: OpenThoughts math problems with reference solutions.
    "openthoughts_math": HubSource("siyanzhao/Openthoughts_math_30k_opsd", "train"),
}


def hub_sources(overrides: Mapping[str, Any] | None = None) -> dict[str, HubSource]:
    """:data:`HUB_SOURCES` with ``overrides`` (``{name: "owner/dataset"}`` or ``{name: {"name": ...,
    "split": ..., "config": ...}}``) applied."""
    out = dict(HUB_SOURCES)
    for key, spec in (overrides or {}).items():
        if isinstance(spec, str):
            spec = HubSource(spec)
        elif isinstance(spec, Mapping):
            spec = HubSource(**spec)
        elif not isinstance(spec, HubSource):
            raise TypeError(f"source {key!r}: {spec!r} is not a hub name or a mapping")
        out[key] = spec
    return out


def available_sources(files: Mapping[str, Any], hub: Mapping[str, HubSource], data_dir: Path | None) -> list[str]:
    """Every source name: explicit files, hub sources, local sources and ``data_dir``'s folders."""
    names = list(files) + list(hub) + list(LOCAL_SOURCES)
    if data_dir is not None and data_dir.is_dir():
        names += [p.name for p in sorted(data_dir.iterdir()) if p.is_dir()]
    return sorted(set(names))


def local_file(source: str, files: Mapping[str, Path], data_dir: Path | None) -> Path | None:
    """The file ``source`` is read from: given in ``files``, or ``{data_dir}/{source}/test`` (or
    ``train``) ``.jsonl`` / ``.parquet``; None if there is none."""
    if source in files:
        return files[source]
    if data_dir is not None:
        for name in ("test", "train"):
            path = find_record_file(data_dir / source / name)
            if path is not None:
                return path
    return None


# ----------------------------------------------------------------------------------------------
# records


def normalize_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"problem", "answer", "solution", "id"}`` from any of the supported schemas.

    Raises ``ValueError`` naming the problem when a field is missing.
    """
    problem = next((record[k] for k in ("problem", "question") if isinstance(record.get(k), str)), None)
    if not problem or not problem.strip():
        raise ValueError(f"no 'problem' or 'question' text (keys: {sorted(record)})")
    solution = record.get("solution")
    solution = solution if isinstance(solution, str) and solution.strip() else None
    answer = record.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        answer = last_boxed(solution) if solution else None
        if answer is None:
            raise ValueError("no 'answer' field and no \\boxed{} answer in 'solution'")
    answer = answer_to_str(answer)
    # a solution that is only the boxed answer (math-ai/aime24) is not a worked solution
    if solution is not None and normalize_answer(solution) == normalize_answer(answer):
        solution = None
    rid = next((record[k] for k in ("id", "idx", "problem_idx", "unique_id") if record.get(k) is not None), None)
    return {"problem": problem, "answer": answer, "solution": solution, "id": rid}


def to_example(record: Mapping[str, Any], source: str, split: str, index: int, *, instruction: str,
               system_prompt: str | None, task: str = "math", prefix: str = "") -> TaskExample:
    """One record of ``source`` (``index``: its position, the id when it has none; ``prefix``: put
    before the problem in the student's prompt). The bare problem is kept as ``reference["problem"]``:
    OPSD's teacher context restates the problem without the student's prefix and instruction."""
    norm = normalize_record(record)
    rid = norm["id"] if norm["id"] is not None else index
    reference = {"answer": norm["answer"], "problem": norm["problem"]}
    if norm["solution"] is not None:
        reference["solution"] = norm["solution"]
    # "domain" is the label the evaluation groups by (val/domain/<source>/...): a test split of
    # several sources (AIME24 + AIME25 + HMMT25) is reported per source as well as pooled
    meta = {"source": source, "domain": source, "split": split, "id": rid}
    for key in ("type", "problem_type", "level", "subject", "url"):
        if record.get(key) is not None:
            meta[key] = record[key]
    messages = build_messages(prefix + norm["problem"], instruction, system_prompt)
    return TaskExample(uid=f"math/{source}/{rid}", task=task, messages=messages, reference=reference, meta=meta)


Convert = Callable[[Mapping[str, Any], int], TaskExample]  # (record, index) -> example


def examples_from_file(path: str | Path, convert: Convert) -> list[TaskExample]:
    """``convert`` over a JSON-lines or Parquet file (errors name the file and line)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"math data file not found: {path}")
    examples = []
    for i, (line_no, rec) in enumerate(iter_records(path)):
        try:
            examples.append(convert(rec, i))
        except ValueError as e:
            raise DataFormatError(path, line_no, str(e)) from None
    return examples


def examples_from_hub(spec: HubSource, convert: Convert) -> list[TaskExample]:
    """``convert`` over a hub dataset (errors name the dataset and row)."""
    from datasets import load_dataset

    ds = load_dataset(spec.name, spec.config, split=spec.split) if spec.config else load_dataset(spec.name, split=spec.split)
    examples = []
    for i, rec in enumerate(ds):
        try:
            examples.append(convert(rec, i))
        except ValueError as e:
            raise ValueError(f"{spec.name} ({spec.split}) row {i}: {e}") from None
    return examples
