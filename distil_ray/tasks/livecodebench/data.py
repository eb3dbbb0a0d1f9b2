"""LiveCodeBench records: decoding private tests, the date window, the train split's test subset,
record → :class:`TaskExample`, and reading records from local files or the hub.

Private tests are base64(zlib(pickle(JSON text))) (or plain JSON text in some older records); they
are decoded with a restricted unpickler that refuses every global (``find_class``), so a crafted
payload raises :class:`UnsafePickleError` instead of running.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import random
import re
import zlib
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator

from distil_ray.tasks.base import RECORD_SUFFIXES, DataFormatError, TaskExample, iter_records
from distil_ray.tasks.livecodebench.prompts import SYSTEM_PROMPT, build_prompt

HUB_NAME = "livecodebench/code_generation_lite"
SPLITS = ("train", "test")
TEST_CASE_SOURCES = ("all", "public", "private")


# ---------------------------------------------------------------------------------------------
# Decoding private tests
# ---------------------------------------------------------------------------------------------


class UnsafePickleError(pickle.UnpicklingError):
    """A test payload tried to load a global (class, function): refused, nothing is executed."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only plain data (str, bytes, list, dict, tuple, numbers, bool, None)."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        raise UnsafePickleError(
            f"refusing to load global {module}.{name} from a test-case pickle: only plain "
            "str/bytes/list/dict/int/float/bool/None payloads are allowed"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a persistent id in a test-case pickle")


_PLAIN_TYPES = (str, bytes, int, float, bool, type(None))


def _check_plain(obj: Any, depth: int = 0) -> None:
    if depth > 64:
        raise pickle.UnpicklingError("test-case payload is nested too deeply")
    if isinstance(obj, _PLAIN_TYPES):
        return
    if isinstance(obj, (list, tuple)):
        for item in obj:
            _check_plain(item, depth + 1)
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, depth + 1)
            _check_plain(value, depth + 1)
        return
    raise UnsafePickleError(f"test-case payload holds a {type(obj).__name__}, not plain data")


def safe_unpickle(data: bytes) -> Any:
    """``pickle.loads`` restricted to plain data: any global / persistent id raises."""
    obj = _PlainDataUnpickler(io.BytesIO(data)).load()
    _check_plain(obj)
    return obj


def _normalize_tests(raw: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(raw, list):
        raise ValueError(f"{what}: expected a list of test cases, got {type(raw).__name__}")
    tests = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or not isinstance(t.get("input"), str) or not isinstance(t.get("output"), str):
            raise ValueError(f"{what}: test {i} is not an object with string 'input' and 'output'")
        tests.append({"input": t["input"], "output": t["output"], "testtype": str(t.get("testtype", ""))})
    return tests


def decode_private_tests(encoded: str | bytes, *, max_bytes: int = 1 << 31) -> list[dict[str, str]]:
    """Decode ``private_test_cases``: base64 → zlib → (restricted) pickle → JSON text → tests.

    Plain JSON text (as in some older records) is accepted too; an empty value means no tests.
    Raises :class:`UnsafePickleError` for a payload that loads any global, ``ValueError`` otherwise.
    """
    if isinstance(encoded, bytes):
        encoded = encoded.decode("ascii", errors="strict")
    text = encoded.strip()
    if not text:
        return []
    if text[0] == "[":
        return _normalize_tests(json.loads(text), "private_test_cases")
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"private_test_cases is neither JSON nor base64: {e}") from None
    d = zlib.decompressobj()
    try:
        data = d.decompress(raw, max_bytes)
    except zlib.error as e:
        raise ValueError(f"private_test_cases: zlib: {e}") from None
    if d.unconsumed_tail:
        raise ValueError(f"private_test_cases decompresses to more than {max_bytes} bytes")
    obj = safe_unpickle(data)
    if isinstance(obj, bytes):
        obj = obj.decode("utf-8")
    if isinstance(obj, str):
        obj = json.loads(obj)
    return _normalize_tests(obj, "private_test_cases")


def encode_private_tests(tests: list[dict[str, str]]) -> str:
    """The inverse of :func:`decode_private_tests` (the hub's encoding); for fixtures."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Records → examples
# ---------------------------------------------------------------------------------------------


def parse_contest_date(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, str) and value.strip():
        s = value.strip().replace("Z", "")
        return datetime.fromisoformat(s).replace(tzinfo=None)
    raise ValueError(f"contest_date {value!r} is not an ISO date")


def as_date(value: str | datetime | None) -> datetime | None:
    return None if value is None else parse_contest_date(value)


def in_date_window(record: dict[str, Any], start: str | datetime | None, end: str | datetime | None) -> bool:
    """``start <= contest_date < end`` (a ``None`` bound is open)."""
    date = parse_contest_date(record.get("contest_date"))
    lo, hi = as_date(start), as_date(end)
    return (lo is None or date >= lo) and (hi is None or date < hi)


def select_train_tests(tests: list[Any], *, fraction: float = 0.5, seed: int = 0, key: str = "") -> list[Any]:
    """The train split's tests: ``max(1, int(n * fraction))`` of the ``n`` tests (none if n == 0),
    drawn by ``random.Random(f"{seed}:{key}").sample(range(n), k)``, kept in their original order."""
    n = len(tests)
    if n == 0:
        return []
    k = min(n, max(1, int(n * fraction)))
    idx = sorted(random.Random(f"{seed}:{key}").sample(range(n), k))
    return [tests[i] for i in idx]


def _metadata(record: dict[str, Any]) -> dict[str, Any]:
    meta = record.get("metadata") or {}
    if isinstance(meta, str):
        meta = json.loads(meta) if meta.strip() else {}
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    return meta


def record_tests(record: dict[str, Any], test_cases: str = "all") -> list[dict[str, str]]:
    """The record's tests: public then private (``test_cases="all"``), or one of the two."""
    if test_cases not in TEST_CASE_SOURCES:
        raise ValueError(f"test_cases must be one of {TEST_CASE_SOURCES}, not {test_cases!r}")
    public = record.get("public_test_cases") or "[]"
    public = _normalize_tests(json.loads(public) if isinstance(public, str) else public, "public_test_cases")
    private = record.get("private_test_cases") or ""
    private = decode_private_tests(private) if isinstance(private, (str, bytes)) else _normalize_tests(private, "private_test_cases")
    return {"all": public + private, "public": public, "private": private}[test_cases]


def example_from_record(
    record: dict[str, Any],
    split: str = "test",
    *,
    test_cases: str = "all",
    train_fraction: float = 0.5,
    seed: int = 0,
    system_prompt: str | None = SYSTEM_PROMPT,
    prompt_style: str = "lcb",
) -> TaskExample:
    """One hub record → a :class:`TaskExample` (``split="train"`` keeps the train subset of tests).

    Raises ``ValueError`` (or :class:`UnsafePickleError`) on a malformed record."""
    _check_split(split)
    if not isinstance(record, dict):
        raise ValueError(f"record is a {type(record).__name__}, not an object")
    for name in ("question_id", "question_content"):
        if not isinstance(record.get(name), str) or not record[name].strip():
            raise ValueError(f"missing or empty field {name!r}")
    qid = record["question_id"]
    starter = record.get("starter_code") or ""
    func_name = _metadata(record).get("func_name") or None
    tests = record_tests(record, test_cases)
    types = {t["testtype"] for t in tests if t["testtype"]}
    if len(types) > 1:
        raise ValueError(f"mixed test types {sorted(types)}")
    testtype = types.pop() if types else ("functional" if func_name else "stdin")
    if testtype not in ("stdin", "functional"):
        raise ValueError(f"unknown testtype {testtype!r}")
    if testtype == "functional" and not func_name:
        raise ValueError("functional tests but metadata has no func_name")
    if not tests:
        raise ValueError("no test cases")
    n_all = len(tests)
    if split == "train":
        tests = select_train_tests(tests, fraction=train_fraction, seed=seed, key=qid)
    date = record.get("contest_date")
    return TaskExample(
        uid=f"livecodebench/{split}/{qid}",
        task="livecodebench",
        messages=build_prompt(record["question_content"], starter, system_prompt, prompt_style),
        reference={"tests": tests, "testtype": testtype, "func_name": func_name},
        meta={
            "question_id": qid,
            "question_title": record.get("question_title", ""),
            "platform": record.get("platform", ""),
            "contest_id": record.get("contest_id", ""),
            "contest_date": date.isoformat() if isinstance(date, datetime) else date,
            "difficulty": record.get("difficulty", ""),
            "testtype": testtype,
            "n_tests": len(tests),
            "n_tests_all": n_all,
        },
    )


def iter_file_records(path: str | os.PathLike) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(file, 1-based line/row number, record) for every record of a JSON-lines or Parquet file,
    or of every such file in a directory (sorted by name). A bad line raises
    :class:`DataFormatError`."""
    path = Path(path)
    files = sorted(f for f in path.iterdir() if f.suffix in RECORD_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no *.jsonl or *.parquet files in {path}")
    for f in files:
        for lineno, rec in iter_records(f):
            yield f, lineno, rec


def load_hub_records(name: str = HUB_NAME, *, version_tag: str = "release_v6", revision: str | None = None,
                     trust_remote_code: bool = True, split: str = "test") -> Iterable[dict[str, Any]]:
    """Records straight from the Hugging Face hub (needs network access)."""
    import datasets

    kwargs: dict[str, Any] = {"split": split, "trust_remote_code": trust_remote_code}
    if version_tag:
        kwargs["version_tag"] = version_tag
    if revision:
        kwargs["revision"] = revision
    return datasets.load_dataset(name, **kwargs)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def examples_from_records(records: Iterable[dict[str, Any]], split: str,
                          window: tuple[str | datetime | None, str | datetime | None] = (None, None),
                          **options: Any) -> list[TaskExample]:
    """The records inside the date ``window`` (start, end) as examples (``options``: those of
    :func:`example_from_record`); a ``ValueError`` names the record that failed."""
    _check_split(split)
    out = []
    for i, rec in enumerate(records):
        try:
            if in_date_window(rec, *window):
                out.append(example_from_record(rec, split, **options))
        except Exception as e:
            raise ValueError(f"record {i} ({rec.get('question_id', '?') if isinstance(rec, dict) else '?'}): {e}") from e
    return out


def load_examples(source: str | os.PathLike, split: str,
                  window: tuple[str | datetime | None, str | datetime | None] = (None, None),
                  hub_options: dict[str, Any] | None = None, **options: Any) -> list[TaskExample]:
    """:func:`examples_from_records` over a local JSON-lines / Parquet file or directory (errors
    are :class:`DataFormatError` naming the file and line), or over a hub dataset
    (``hub_options``: those of :func:`load_hub_records`)."""
    _check_split(split)
    source = str(source)
    if Path(source).exists():
        out = []
        for f, lineno, rec in iter_file_records(source):
            try:
                if in_date_window(rec, *window):
                    out.append(example_from_record(rec, split, **options))
            except DataFormatError:
                raise
            except Exception as e:
                raise DataFormatError(f, lineno, f"{type(e).__name__}: {e}") from e
        return out
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", source):
        return examples_from_records(load_hub_records(source, **(hub_options or {})), split, window, **options)
    raise FileNotFoundError(f"{source} is neither a local JSONL file/directory nor a hub dataset name")
