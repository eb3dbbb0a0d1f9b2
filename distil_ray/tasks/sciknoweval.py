"""SciKnowEval level-3 multiple-choice questions, split and graded as the SDPO baseline does.

Sources (per domain: biology, chemistry, material, physics)
-----------------------------------------------------------
* ``data_dir``: processed files ``{data_dir}/{domain}/{split}.jsonl`` (``prompt``, ``system``,
  ``answer``, ``idx``, ``description``, ...), used as they are.
* ``raw_path``: a JSON-lines file of records in the hub schema (``question``,
  ``choices{text,label}``, ``answerKey``, ``type``, ``domain``, ``details{level,...}``), or
* neither: the hub dataset ``hub_name`` (split ``test``) through ``datasets.load_dataset``.

Raw records are turned into the processed form exactly as SDPO's preprocessing does: keep
``domain == Domain``, ``details.level == "L3"``, ``type in {mcq-4-choices, mcq-2-choices}`` (in the
hub's order); render each (:func:`format_raw_record`); number them ``idx = 0..n-1``; then
``datasets.Dataset.train_test_split(test_size=0.1, seed=42)`` (:func:`split_records`), whose
row order is also kept.

Grading (SDPO's ``mcq`` reward)
-------------------------------
The extracted answer is ``response.split("<answer>")[-1].split("</answer>")[0].strip()`` — the
text between the last ``<answer>`` and the following ``</answer>``; without tags this is the
whole (stripped) response, so a bare ``"B"`` counts, exactly as in SDPO. ``strict_tags=True``
instead requires an ``<answer>`` tag. Reward 1 iff the extracted text equals the answer letter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from distil_ray.tasks.base import DataFormatError, Grade, TaskExample, find_record_file, iter_records

__all__ = [
    "DOMAINS",
    "SPLITS",
    "SYSTEM_PROMPT",
    "SciKnowEvalTask",
    "extract_answer",
    "format_raw_record",
    "select_raw_records",
    "split_records",
]

DOMAINS = ("biology", "chemistry", "material", "physics")
SPLITS = ("train", "test")
LEVEL = "L3"
MCQ_TYPES = ("mcq-4-choices", "mcq-2-choices")
HUB_NAME = "hicai-zju/SciKnowEval"

# Used for every question, the two-option ones included (as in the processed files).
SYSTEM_PROMPT = """
Given a question and four options, please select the right answer. Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>

For the answer, only output the letter corresponding to the correct option (A, B, C, or D), and nothing else. Do not restate the answer text. For example, if the answer is "A", just output:
<answer>
A
</answer>
"""
PROMPT_SUFFIX = "\nPlease reason step by step."
DESCRIPTION_SUFFIX = " The solution will be evaluated in a mcq environment."

_OPTION_LINE = re.compile(r"^([A-Z]): ", flags=re.MULTILINE)


def _check_domain(domain: str) -> str:
    d = str(domain).lower()
    if d not in DOMAINS:
        raise ValueError(f"unknown SciKnowEval domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    return d


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown SciKnowEval split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


# ----------------------------------------------------------------------------------------------
# raw hub records -> processed records


def format_raw_record(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A raw hub record rendered like the processed files (without ``idx``).

    ``prompt = question + "\\n\\n" + "\\n".join(f"{label}: {text}") + "\\nPlease reason step by step."``
    """
    try:
        question = raw["question"]
        texts, labels = raw["choices"]["text"], raw["choices"]["label"]
        answer = raw["answerKey"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a SciKnowEval hub record (missing {e}): keys {sorted(raw)}") from None
    if len(texts) != len(labels):
        raise ValueError(f"choices has {len(texts)} texts but {len(labels)} labels")
    options = "\n".join(f"{label}: {text}" for label, text in zip(labels, texts))
    return {
        "kind": "mcq",
        "dataset": "sciknoweval",
        "answer": answer,
        "elo": 1500,
        "prompt": question + "\n\n" + options + PROMPT_SUFFIX,
        "description": question + DESCRIPTION_SUFFIX,
        "tests": "-",
        "system": SYSTEM_PROMPT,
        "labels": list(labels),
        "details": dict(raw.get("details") or {}),
        "type": raw.get("type"),
    }


def select_raw_records(raw_records: Iterable[Mapping[str, Any]], domain: str) -> list[Mapping[str, Any]]:
    """The raw records SDPO keeps for ``domain``: that domain, level L3, 4- or 2-choice MCQs (in order)."""
    domain = _check_domain(domain)
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


def _raw_to_processed(raw_records: Iterable[Mapping[str, Any]], domain: str, test_size: float, seed: int):
    kept = select_raw_records(raw_records, domain)
    processed = []
    for idx, raw in enumerate(kept):
        rec = format_raw_record(raw)
        rec["idx"] = idx
        processed.append(rec)
    return split_records(processed, test_size=test_size, seed=seed)


# ----------------------------------------------------------------------------------------------
# grading


def extract_answer(response: str, strict_tags: bool = False) -> str | None:
    """SDPO's extraction: the stripped text between the last ``<answer>`` and the next ``</answer>``.

    Without an ``<answer>`` tag SDPO takes the whole response (up to a ``</answer>``); with
    ``strict_tags`` that case returns ``None``.
    """
    if strict_tags and "<answer>" not in response:
        return None
    return response.split("<answer>")[-1].split("</answer>")[0].strip()


def _option_labels(prompt: str) -> list[str]:
    labels = _OPTION_LINE.findall(prompt)
    # the option block is the last run "A, B, ..." of such lines
    for start in range(len(labels) - 1, -1, -1):
        if labels[start] == "A":
            run = labels[start:]
            if run == [chr(ord("A") + i) for i in range(len(run))]:
                return run
    return ["A", "B", "C", "D"]


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# the task


class SciKnowEvalTask:
    """SciKnowEval L3 MCQ: ``load("train" | "test")`` over the chosen domains; SDPO's grading.

    ``meta["domain"]`` holds the domain (for per-domain metrics). ``reveal_answer=True`` puts the
    correct letter into the feedback of wrong answers (off by default: the feedback then says only
    what was extracted and whether it is right).
    """

    name = "sciknoweval"

    def __init__(
        self,
        domains: str | Sequence[str] | None = None,
        data_dir: str | Path | None = None,
        raw_path: str | Path | None = None,
        hub_name: str = HUB_NAME,
        test_size: float = 0.1,
        seed: int = 42,
        strict_tags: bool = False,
        reveal_answer: bool = False,
    ):
        if domains is None:
            domains = DOMAINS
        elif isinstance(domains, str):
            domains = [domains]
        self.domains = [_check_domain(d) for d in domains]
        if not self.domains:
            raise ValueError(f"no domains given; valid domains: {', '.join(DOMAINS)}")
        if data_dir is not None and raw_path is not None:
            raise ValueError("give data_dir (processed files) or raw_path (hub-schema records), not both")
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.raw_path = Path(raw_path) if raw_path is not None else None
        self.hub_name = hub_name
        self.test_size, self.seed = test_size, seed
        self.strict_tags, self.reveal_answer = strict_tags, reveal_answer
        self._raw_cache: list[Mapping[str, Any]] | None = None

    # -- loading ----------------------------------------------------------------------------

    def load(self, split: str) -> list[TaskExample]:
        split = _check_split(split)
        examples: list[TaskExample] = []
        for domain in self.domains:
            if self.data_dir is not None:
                examples += self._load_processed(domain, split)
            else:
                parts = _raw_to_processed(self._raw_records(), domain, self.test_size, self.seed)
                examples += [self.to_example(rec, domain, split) for rec in parts[split]]
        return examples

    def _load_processed(self, domain: str, split: str) -> list[TaskExample]:
        path = find_record_file(self.data_dir / domain / split)
        if path is None:
            raise FileNotFoundError(
                f"SciKnowEval file not found: {self.data_dir / domain / split}.jsonl (or .parquet)"
            )
        out = []
        for line_no, rec in iter_records(path):
            missing = [k for k in ("prompt", "answer", "idx") if k not in rec]
            if missing:
                raise DataFormatError(path, line_no, f"missing field(s) {', '.join(missing)}")
            if not isinstance(rec["prompt"], str) or not isinstance(rec["answer"], str) or not rec["answer"].strip():
                raise DataFormatError(path, line_no, "'prompt' and 'answer' must be non-empty strings")
            out.append(self.to_example(rec, domain, split))
        return out

    def _raw_records(self) -> list[Mapping[str, Any]]:
        if self._raw_cache is None:
            if self.raw_path is not None:
                records = []
                for line_no, rec in iter_records(self.raw_path):
                    for key in ("question", "choices", "answerKey", "type", "domain", "details"):
                        if key not in rec:
                            raise DataFormatError(self.raw_path, line_no, f"missing field {key!r}")
                    records.append(rec)
            else:
                from datasets import load_dataset

                records = list(load_dataset(self.hub_name, split="test"))
            self._raw_cache = records
        return self._raw_cache

    def to_example(self, rec: Mapping[str, Any], domain: str, split: str) -> TaskExample:
        """A processed record (as in the files, or from :func:`format_raw_record` plus ``idx``)."""
        prompt = rec["prompt"]
        system = rec.get("system") or SYSTEM_PROMPT
        labels = list(rec.get("labels") or _option_labels(prompt))
        meta = {"domain": domain, "split": split, "idx": rec["idx"], "dataset": "sciknoweval"}
        for key in ("level", "task", "subtask", "source"):
            if (rec.get("details") or {}).get(key) is not None:
                meta[key] = rec["details"][key]
        if rec.get("type"):
            meta["type"] = rec["type"]
        return TaskExample(
            uid=f"sciknoweval/{domain}/{split}/{rec['idx']}",
            task=self.name,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            reference={"answer": rec["answer"].strip(), "options": labels},
            meta=meta,
        )

    # -- grading ----------------------------------------------------------------------------

    def grade(self, example: TaskExample, response: str) -> Grade:
        gold = example.reference["answer"]
        options = example.reference.get("options") or ["A", "B", "C", "D"]
        has_open, has_close = "<answer>" in response, "</answer>" in response
        extracted = extract_answer(response, strict_tags=self.strict_tags)
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
        if not correct and self.reveal_answer:
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
