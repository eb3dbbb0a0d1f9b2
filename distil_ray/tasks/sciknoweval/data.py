"""SciKnowEval records: the processed SDPO files, raw hub records rendered and split as SDPO's
preprocessing does, and record → :class:`TaskExample`.

Raw records are kept when ``domain == Domain``, ``details.level == "L3"`` and ``type in
{mcq-4-choices, mcq-2-choices}`` (in the hub's order); rendered (:func:`format_raw_record`);
numbered ``idx = 0..n-1``; then split by ``datasets.Dataset.train_test_split(test_size=0.1,
seed=42)`` (:func:`split_records`), whose row order is also kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from distil_ray.tasks.base import DataFormatError, TaskExample, find_record_file, iter_records
from distil_ray.tasks.sciknoweval.prompts import DESCRIPTION_SUFFIX, SYSTEM_PROMPT, messages_for, render_question

DOMAINS = ("biology", "chemistry", "material", "physics")
SPLITS = ("train", "test")
LEVEL = "L3"
MCQ_TYPES = ("mcq-4-choices", "mcq-2-choices")
HUB_NAME = "hicai-zju/SciKnowEval"

_OPTION_LINE = re.compile(r"^([A-Z]): ", flags=re.MULTILINE)


def check_domain(domain: str) -> str:
    d = str(domain).lower()
    if d not in DOMAINS:
        raise ValueError(f"unknown SciKnowEval domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    return d


def selected_domains(domains: str | Sequence[str] | None) -> list[str]:
    """The domains a task covers (``None``: all of them; one name or a list), lower-cased."""
    if domains is None:
        domains = DOMAINS
    elif isinstance(domains, str):
        domains = [domains]
    out = [check_domain(d) for d in domains]
    if not out:
        raise ValueError(f"no domains given; valid domains: {', '.join(DOMAINS)}")
    return out


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown SciKnowEval split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


# ----------------------------------------------------------------------------------------------
# raw hub records -> processed records


def format_raw_record(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A raw hub record rendered like the processed files (without ``idx``); the prompt is
    :func:`~distil_ray.tasks.sciknoweval.prompts.render_question`."""
    try:
        question = raw["question"]
        texts, labels = raw["choices"]["text"], raw["choices"]["label"]
        answer = raw["answerKey"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a SciKnowEval hub record (missing {e}): keys {sorted(raw)}") from None
    if len(texts) != len(labels):
        raise ValueError(f"choices has {len(texts)} texts but {len(labels)} labels")
    return {
        "kind": "mcq",
        "dataset": "sciknoweval",
        "answer": answer,
        "elo": 1500,
        "prompt": render_question(question, labels, texts),
        "description": question + DESCRIPTION_SUFFIX,
        "tests": "-",
        "system": SYSTEM_PROMPT,
        "labels": list(labels),
        "details": dict(raw.get("details") or {}),
        "type": raw.get("type"),
    }


def select_raw_records(raw_records: Iterable[Mapping[str, Any]], domain: str) -> list[Mapping[str, Any]]:
    """The raw records SDPO keeps for ``domain``: that domain, level L3, 4- or 2-choice MCQs (in order)."""
    domain = check_domain(domain)
    return [
        r
        for r in raw_records
        if str(r.get("domain", "")).lower() == domain
        and (r.get("details") or {}).get("level") == LEVEL
        and r.get("type") in MCQ_TYPES
    ]


def split_records(
    records: Sequence[Any], test_size: float = 0.1, seed: int = 42
) -> dict[str, list[Any]]:
    """``{"train": [...], "test": [...]}`` in the rows and order of
    ``datasets.Dataset.train_test_split(test_size, seed)`` over ``records`` (any objects)."""
    records = list(records)
    if not records:
        return {"train": [], "test": []}
    from datasets import Dataset

    positions = Dataset.from_dict({"_pos": list(range(len(records)))})
    try:
        parts = positions.train_test_split(test_size=test_size, seed=seed)
    except ValueError as e:
        raise ValueError(f"cannot split {len(records)} records with test_size={test_size}: {e}") from None
    return {name: [records[i] for i in parts[name]["_pos"]] for name in SPLITS}


def raw_to_processed(raw_records: Iterable[Mapping[str, Any]], domain: str, test_size: float, seed: int):
    """``domain``'s kept raw records, rendered, numbered and split (see the module docstring)."""
    kept = select_raw_records(raw_records, domain)
    processed = []
    for idx, raw in enumerate(kept):
        rec = format_raw_record(raw)
        rec["idx"] = idx
        processed.append(rec)
    return split_records(processed, test_size=test_size, seed=seed)


# ----------------------------------------------------------------------------------------------
# files -> records -> examples


def read_processed(data_dir: Path, domain: str, split: str) -> list[dict[str, Any]]:
    """The records of ``{data_dir}/{domain}/{split}.jsonl`` (or ``.parquet``), checked."""
    path = find_record_file(data_dir / domain / split)
    if path is None:
        raise FileNotFoundError(
            f"SciKnowEval file not found: {data_dir / domain / split}.jsonl (or .parquet)"
        )
    out = []
    seen: dict[Any, int] = {}
    for line_no, rec in iter_records(path):
        missing = [k for k in ("prompt", "answer", "idx") if k not in rec]
        if missing:
            raise DataFormatError(path, line_no, f"missing field(s) {', '.join(missing)}")
        if not isinstance(rec["prompt"], str) or not isinstance(rec["answer"], str) or not rec["answer"].strip():
            raise DataFormatError(path, line_no, "'prompt' and 'answer' must be non-empty strings")
        labels = list(rec.get("labels") or _option_labels(rec["prompt"]))
        if rec["answer"].strip() not in labels:
            # the grader compares the extracted letter exactly: such a record could never be answered
            raise DataFormatError(path, line_no, f"answer {rec['answer']!r} is not one of the options {', '.join(labels)}")
        if rec["idx"] in seen:
            raise DataFormatError(path, line_no, f"idx {rec['idx']!r} is already used on line {seen[rec['idx']]}")
        seen[rec["idx"]] = line_no
        out.append(rec)
    if not out:
        raise DataFormatError(path, 1, "the file has no records")
    return out


def read_raw(raw_path: Path | None, hub_name: str = HUB_NAME) -> list[Mapping[str, Any]]:
    """Raw hub-schema records from a JSON-lines / Parquet file, or else from the hub."""
    if raw_path is None:
        from datasets import load_dataset

        return list(load_dataset(hub_name, split="test"))
    records = []
    for line_no, rec in iter_records(raw_path):
        for key in ("question", "choices", "answerKey", "type", "domain", "details"):
            if key not in rec:
                raise DataFormatError(raw_path, line_no, f"missing field {key!r}")
        records.append(rec)
    return records


def _option_labels(prompt: str) -> list[str]:
    labels = _OPTION_LINE.findall(prompt)
    # the option block is the last run "A, B, ..." of such lines
    for start in range(len(labels) - 1, -1, -1):
        if labels[start] == "A":
            run = labels[start:]
            if run == [chr(ord("A") + i) for i in range(len(run))]:
                return run
    return ["A", "B", "C", "D"]


def to_example(rec: Mapping[str, Any], domain: str, split: str, task: str = "sciknoweval") -> TaskExample:
    """A processed record (as in the files, or from :func:`format_raw_record` plus ``idx``)."""
    prompt = rec["prompt"]
    labels = list(rec.get("labels") or _option_labels(prompt))
    meta = {"domain": domain, "split": split, "idx": rec["idx"], "dataset": "sciknoweval"}
    for key in ("level", "task", "subtask", "source"):
        if (rec.get("details") or {}).get(key) is not None:
            meta[key] = rec["details"][key]
    if rec.get("type"):
        meta["type"] = rec["type"]
    return TaskExample(
        uid=f"sciknoweval/{domain}/{split}/{rec['idx']}",
        task=task,
        messages=messages_for(prompt, rec.get("system")),
        reference={"answer": rec["answer"].strip(), "options": labels},
        meta=meta,
    )
