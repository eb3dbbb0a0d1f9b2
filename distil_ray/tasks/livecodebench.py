"""LiveCodeBench (``livecodebench/code_generation_lite``): code generation graded by execution.

Records
-------
One record per problem, in the hub schema: ``question_title``, ``question_content``, ``platform``,
``question_id``, ``contest_id``, ``contest_date`` (ISO string), ``starter_code`` (empty for stdin
problems), ``difficulty``, ``public_test_cases`` (JSON text: a list of
``{"input", "output", "testtype"}``), ``private_test_cases`` (base64(zlib(pickle(JSON text))), or
plain JSON text in some older records) and ``metadata`` (JSON text; ``func_name`` for functional,
LeetCode-style problems). Private tests are decoded with a restricted unpickler that refuses every
global (``find_class``), so a crafted payload raises :class:`UnsafePickleError` instead of running.

Splits (the SDPO LiveCodeBench-v6 setup)
----------------------------------------
Both splits hold the same problems: those with ``start_date <= contest_date < end_date``
(default 2025-02-01 ≤ date < 2025-05-01; ``None`` disables a bound).

* ``test``: every test of the problem (public followed by private, see ``test_cases``).
* ``train``: a random subset of those tests, chosen by :func:`select_train_tests`: with ``n``
  tests, ``k = max(1, int(n * train_fraction))`` indices are drawn without replacement by
  ``random.Random(f"{seed}:{question_id}").sample(range(n), k)`` and kept in their original order.
  The string seed makes the choice depend only on (seed, problem id, test count), not on which
  other problems were loaded or in which order.  (SDPO's own script draws with one global
  ``np.random.seed(0)`` stream over its private tests in dataset order; the fraction and floor rule
  are the same, the exact subset is not.)

Grading
-------
The last ```` ```python ```` block of the response is the program (fallback: the last fenced block
of any language). Every execution goes through :func:`distil_ray.feedback.sandbox.run_python`,
one process per test, under a small driver that prepends the usual competitive-programming imports
(the official harness does the same), compiles the program as ``solution.py`` (so tracebacks
point at the model's own lines) and then

* stdin problems: runs it with ``__name__ == "__main__"`` and the test input as standard input;
  ``SystemExit`` ends the program normally (as in the official harness);
* functional problems: parses each non-empty input line as JSON (positional arguments), calls
  ``Solution().<func_name>(*args)`` (or a module-level ``<func_name>`` if there is no class
  ``Solution``), and writes the JSON of the result on a marked line of the real stdout (anything
  the solution prints itself is discarded).

Output comparison follows the official LiveCodeBench harness:

* stdin: both texts are ``strip()``-ed, split on ``"\\n"`` and each line ``strip()``-ed; the line
  counts must be equal (so leading/trailing blank lines and trailing spaces do not matter, but a
  blank line *inside* the output does); lines that differ as strings are split on whitespace and
  every token converted with ``decimal.Decimal``; the lines match when both convert and the lists
  of values are equal. This is exact decimal equality, not a tolerance: ``1.0 == 1`` and
  ``1e3 == 1000``, but ``0.30000001 != 0.3``. A comparison that raises (signalling NaN) is a
  mismatch.
* functional: the returned value after a JSON round trip (tuples become lists) ``==`` the expected
  output parsed as JSON (Python equality, so ``1 == 1.0``).

Reward is 1 only when every test passes; ``score`` is the fraction of tests passed; ``feedback``
is a summary plus the first failing tests (at most ``max_feedback_tests``) with input / expected /
actual output or the traceback's last lines / a time-limit message, at most
``max_feedback_chars`` characters. Each test runs under ``timeout_s`` (default 6 s, as the
official harness), ``memory_mb`` and an output cap (``max_output_bytes``, default: twice the
expected output, at least 1 MiB); ``sandbox_kwargs`` go to ``run_python`` as they are. Tests still unrun when ``total_timeout_s`` runs out are counted
as failed ("skipped").
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import random
import re
import secrets
import time
import zlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Iterator

from distil_ray.tasks.base import RECORD_SUFFIXES, DataFormatError, Grade, TaskExample, iter_records

HUB_NAME = "livecodebench/code_generation_lite"
SPLITS = ("train", "test")
TEST_CASE_SOURCES = ("all", "public", "private")

SYSTEM_PROMPT = (
    "You are an expert Python programmer. You will be given a programming problem and must write a "
    "correct Python program that meets the specification and passes all tests. Give the complete "
    "program in a single ```python code block."
)
_FORMAT_STARTER = (
    "Complete the following starter code and enclose your whole solution in a ```python code block."
)
_FORMAT_STDIN = (
    "Read the input from standard input, solve the problem and write the answer to standard output "
    "(do not hard-code the sample inputs). Enclose your code in a ```python code block as follows."
)


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


def _as_date(value: str | datetime | None) -> datetime | None:
    return None if value is None else parse_contest_date(value)


def in_date_window(record: dict[str, Any], start: str | datetime | None, end: str | datetime | None) -> bool:
    """``start <= contest_date < end`` (a ``None`` bound is open)."""
    date = parse_contest_date(record.get("contest_date"))
    lo, hi = _as_date(start), _as_date(end)
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


def build_prompt(question_content: str, starter_code: str, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """LiveCodeBench-style chat messages: question, format instruction (+ starter code), answer cue."""
    user = f"### Question:\n{question_content}\n\n"
    if starter_code.strip():
        user += f"### Format: {_FORMAT_STARTER}\n```python\n{starter_code.rstrip()}\n```\n\n"
    else:
        user += f"### Format: {_FORMAT_STDIN}\n```python\n# YOUR CODE HERE\n```\n\n"
    user += "### Answer: (use the provided format with backticks)\n\n"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": user}]


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
) -> TaskExample:
    """One hub record → a :class:`TaskExample` (``split="train"`` keeps the train subset of tests).

    Raises ``ValueError`` (or :class:`UnsafePickleError`) on a malformed record."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
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
        messages=build_prompt(record["question_content"], starter, system_prompt),
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


# ---------------------------------------------------------------------------------------------
# Response → code
# ---------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#.\-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PY_TAGS = {"python", "python3", "py", "py3"}


def extract_code(response: str) -> str | None:
    """The last ```` ```python ```` block of the response (fallback: the last fenced block)."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(response or "")]
    for tag, body in reversed(blocks):
        if tag in _PY_TAGS:
            return body
    return blocks[-1][1] if blocks else None


# ---------------------------------------------------------------------------------------------
# Output comparison
# ---------------------------------------------------------------------------------------------


def _stripped_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(tok) for tok in line.split()]
    except Exception:
        return None


def compare_stdout(actual: str, expected: str) -> bool:
    """The official harness's stdin comparison (see the module docstring)."""
    got, want = _stripped_lines(actual), _stripped_lines(expected)
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if g == w:
            continue
        dg, dw = _decimals(g), _decimals(w)
        if dg is None or dw is None:
            return False
        try:
            if dg != dw:
                return False
        except Exception:  # signalling NaN
            return False
    return True


def compare_functional(actual_json: str, expected_json: str) -> bool:
    try:
        got = json.loads(actual_json)
    except ValueError:
        return False
    try:
        want = json.loads(expected_json)
    except ValueError:
        return actual_json.strip() == expected_json.strip()
    try:
        return bool(got == want)
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# Driver run in the sandbox
# ---------------------------------------------------------------------------------------------

# Modules the official harness star-imports and imports before the solution.
_PRELUDE_MODULES = (
    "string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random",
    "statistics", "itertools", "functools", "operator", "io", "sys", "json", "builtins", "typing",
)
PRELUDE = (
    "".join(f"from {m} import *\n" for m in _PRELUDE_MODULES)
    + "".join(f"import {m}\n" for m in _PRELUDE_MODULES if m not in ("builtins", "typing"))
    + "sys.setrecursionlimit(50000)\n"
)

COMPILE_ERROR_EXIT = 3
SOLUTION_FILE = "solution.py"

_DRIVER_BODY = r'''
import sys as _sys, io as _io, json as _json, linecache as _lc, traceback as _tb
_lc.cache[_FILE] = (len(_SRC), None, _SRC.splitlines(True), _FILE)

def _report(exc):
    te = _tb.TracebackException(type(exc), exc, exc.__traceback__)
    te.stack = _tb.StackSummary.from_list([f for f in te.stack if f.filename == _FILE])
    try:
        _sys.stdout.flush()
    except BaseException:
        pass
    _sys.__stderr__.write("".join(te.format()))
    _sys.__stderr__.flush()

try:
    _code = compile(_SRC, _FILE, "exec")
except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as _e:
    _report(_e)
    _sys.exit(_COMPILE_EXIT)

_ns = {"__name__": "__main__" if _MODE == "stdin" else "solution", "__file__": _FILE}
exec(_PRELUDE, _ns)

if _MODE == "stdin":
    try:
        exec(_code, _ns)
    except SystemExit:
        pass
    except BaseException as _e:
        _report(_e)
        _sys.exit(1)
    try:
        _sys.stdout.flush()
    except BaseException:
        pass
else:
    _args = [_json.loads(_l) for _l in _sys.stdin.read().split("\n") if _l.strip()]
    _real_out = _sys.stdout
    _sys.stdout = _io.StringIO()
    try:
        exec(_code, _ns)
        if isinstance(_ns.get("Solution"), type):
            _fn = getattr(_ns["Solution"](), _FUNC)
        elif _FUNC in _ns:
            _fn = _ns[_FUNC]
        else:
            raise NameError(f"no class Solution and no function {_FUNC!r} defined")
        _res = _fn(*_args)
    except BaseException as _e:
        _report(_e)
        _sys.exit(1)
    try:
        _out = _json.dumps(_res)
    except Exception:
        _out = None
    if _out is None:
        _real_out.write(_MARK + "!" + repr(_res)[:2000] + "\n")
    else:
        _real_out.write(_MARK + _out + "\n")
    _real_out.flush()
'''


def build_driver(code: str, testtype: str, func_name: str | None, marker: str) -> str:
    """The program the sandbox runs for one test (see the module docstring)."""
    header = {
        "_SRC": code,
        "_MODE": testtype,
        "_FUNC": func_name or "",
        "_MARK": marker,
        "_FILE": SOLUTION_FILE,
        "_COMPILE_EXIT": COMPILE_ERROR_EXIT,
        "_PRELUDE": PRELUDE,
    }
    return "".join(f"{k} = {v!r}\n" for k, v in header.items()) + _DRIVER_BODY


# ---------------------------------------------------------------------------------------------
# Feedback text
# ---------------------------------------------------------------------------------------------


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = max(1, (limit - 20) // 2)
    return f"{text[:half]}\n...(truncated)...\n{text[-half:]}"


def _tail_lines(text: str, n_lines: int, limit: int) -> str:
    lines = text.rstrip().splitlines()[-n_lines:]
    out = "\n".join(lines)
    return out if len(out) <= limit else "..." + out[-(limit - 3):]


_STATUS_TITLE = {
    "wrong_answer": "wrong answer",
    "runtime_error": "runtime error",
    "compile_error": "the program does not compile",
    "timeout": "time limit exceeded",
    "memory_limit": "memory limit exceeded",
    "output_limit": "output limit exceeded",
    "sandbox_error": "the grader could not run the program",
}


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


@dataclass
class _TestResult:
    status: str  # passed | wrong_answer | runtime_error | compile_error | timeout | memory_limit | output_limit | sandbox_error | skipped
    actual: str = ""
    error: str = ""
    wall_s: float = 0.0


class LiveCodeBenchTask:
    """LiveCodeBench v6 code generation (see the module docstring for splits, harness, feedback).

    ``source``: the hub name (``livecodebench/code_generation_lite``, loaded with ``datasets``
    and ``version_tag`` / ``revision`` / ``trust_remote_code``) or a local JSONL file / directory
    of JSONL files in the hub schema.
    """

    name = "livecodebench"

    def __init__(
        self,
        source: str | os.PathLike = HUB_NAME,
        *,
        version_tag: str = "release_v6",
        revision: str | None = None,
        trust_remote_code: bool = True,
        start_date: str | datetime | None = "2025-02-01",
        end_date: str | datetime | None = "2025-05-01",
        test_cases: str = "all",
        train_fraction: float = 0.5,
        seed: int = 0,
        system_prompt: str | None = SYSTEM_PROMPT,
        timeout_s: float = 6.0,
        total_timeout_s: float = 60.0,
        memory_mb: int = 2048,
        max_output_bytes: int | None = None,
        stop_on_first_failure: bool = False,
        max_feedback_tests: int = 2,
        max_feedback_chars: int = 2000,
        field_chars: int = 300,
        sandbox_kwargs: dict[str, Any] | None = None,
    ):
        if test_cases not in TEST_CASE_SOURCES:
            raise ValueError(f"test_cases must be one of {TEST_CASE_SOURCES}, not {test_cases!r}")
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], not {train_fraction}")
        self.source = str(source)
        self.version_tag, self.revision, self.trust_remote_code = version_tag, revision, trust_remote_code
        self.start_date, self.end_date = _as_date(start_date), _as_date(end_date)
        self.test_cases, self.train_fraction, self.seed = test_cases, train_fraction, seed
        self.system_prompt = system_prompt
        self.timeout_s, self.total_timeout_s, self.memory_mb = timeout_s, total_timeout_s, memory_mb
        self.max_output_bytes = max_output_bytes
        self.stop_on_first_failure = stop_on_first_failure
        self.max_feedback_tests, self.max_feedback_chars, self.field_chars = max_feedback_tests, max_feedback_chars, field_chars
        self.sandbox_kwargs = dict(sandbox_kwargs or {})

    # -- data -----------------------------------------------------------------------------------

    def _in_window(self, record: dict[str, Any]) -> bool:
        return in_date_window(record, self.start_date, self.end_date)

    def _example(self, record: dict[str, Any], split: str) -> TaskExample:
        return example_from_record(record, split, test_cases=self.test_cases, train_fraction=self.train_fraction,
                                   seed=self.seed, system_prompt=self.system_prompt)

    def examples_from_records(self, records: Iterable[dict[str, Any]], split: str) -> list[TaskExample]:
        """Date-filter and convert in-memory records (a ``ValueError`` names the record)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        out = []
        for i, rec in enumerate(records):
            try:
                if self._in_window(rec):
                    out.append(self._example(rec, split))
            except Exception as e:
                raise ValueError(f"record {i} ({rec.get('question_id', '?') if isinstance(rec, dict) else '?'}): {e}") from e
        return out

    def load(self, split: str) -> list[TaskExample]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        if Path(self.source).exists():
            out = []
            for f, lineno, rec in iter_file_records(self.source):
                try:
                    if self._in_window(rec):
                        out.append(self._example(rec, split))
                except DataFormatError:
                    raise
                except Exception as e:
                    raise DataFormatError(f, lineno, f"{type(e).__name__}: {e}") from e
            return out
        if re.fullmatch(r"[\w.\-]+/[\w.\-]+", self.source):
            records = load_hub_records(self.source, version_tag=self.version_tag, revision=self.revision,
                                       trust_remote_code=self.trust_remote_code)
            return self.examples_from_records(records, split)
        raise FileNotFoundError(f"{self.source} is neither a local JSONL file/directory nor a hub dataset name")

    # -- grading --------------------------------------------------------------------------------

    def _run_one(self, driver: str, test: dict[str, str], testtype: str, marker: str, timeout_s: float) -> _TestResult:
        from distil_ray.feedback.sandbox import run_python

        # output cap: fixed if configured, else room for twice the expected output (at least 1 MiB)
        cap = self.max_output_bytes or max(1 << 20, 2 * len(test["output"].encode()) + (1 << 16))
        kwargs = {"max_output_bytes": cap, **self.sandbox_kwargs}
        res = run_python(driver, test["input"], timeout_s=timeout_s, memory_mb=self.memory_mb, **kwargs)
        wall = float(getattr(res, "wall_s", 0.0) or 0.0)
        stdout, stderr = res.stdout or "", res.stderr or ""
        if res.status == "ok":
            if testtype == "stdin":
                ok = compare_stdout(stdout, test["output"])
                return _TestResult("passed" if ok else "wrong_answer", actual=stdout, wall_s=wall)
            lines = [ln[len(marker):] for ln in stdout.split("\n") if ln.startswith(marker)]
            if not lines:
                return _TestResult("runtime_error", error="the program exited before returning a result", wall_s=wall)
            out = lines[-1]
            if out.startswith("!"):
                return _TestResult("wrong_answer", actual=out[1:], error="the returned value is not JSON-serializable", wall_s=wall)
            ok = compare_functional(out, test["output"])
            return _TestResult("passed" if ok else "wrong_answer", actual=out, wall_s=wall)
        if res.status == "runtime_error":
            status = "compile_error" if getattr(res, "returncode", None) == COMPILE_ERROR_EXIT else "runtime_error"
            error = stderr.strip() or f"the program exited with code {getattr(res, 'returncode', '?')}"
            return _TestResult(status, actual=stdout if testtype == "stdin" else "", error=error, wall_s=wall)
        if res.status == "timeout":
            return _TestResult("timeout", error=f"time limit exceeded ({timeout_s:g} s)", wall_s=wall)
        if res.status in ("memory_limit", "output_limit"):
            return _TestResult(res.status, actual=stdout if testtype == "stdin" else "", error=stderr.strip(), wall_s=wall)
        return _TestResult("sandbox_error", error=stderr.strip() or str(res.status), wall_s=wall)

    def run_tests(self, code: str, reference: dict[str, Any]) -> list[_TestResult]:
        tests, testtype = reference["tests"], reference["testtype"]
        marker = f"@@result-{secrets.token_hex(8)}@@"
        driver = build_driver(code, testtype, reference.get("func_name"), marker)
        results: list[_TestResult] = []
        t0 = time.monotonic()
        for i, test in enumerate(tests):
            left = self.total_timeout_s - (time.monotonic() - t0)
            if left <= 0.05:
                results += [_TestResult("skipped", error="total time budget exhausted")] * (len(tests) - i)
                break
            r = self._run_one(driver, test, testtype, marker, min(self.timeout_s, left))
            if r.status == "timeout" and left < self.timeout_s:
                r.error = f"total time budget of {self.total_timeout_s:g} s exhausted"
            results.append(r)
            if r.status == "compile_error" or (self.stop_on_first_failure and r.status != "passed"):
                why = "the program does not compile" if r.status == "compile_error" else "stopped at the first failure"
                results += [_TestResult("skipped", error=why)] * (len(tests) - i - 1)
                break
        return results

    def _feedback(self, tests: list[dict[str, str]], results: list[_TestResult], testtype: str) -> str:
        n, n_pass = len(results), sum(r.status == "passed" for r in results)
        if n_pass == n:
            return f"All {n} tests passed."
        fc = self.field_chars
        parts = [f"Passed {n_pass}/{n} tests."]
        shown = 0
        for i, (test, r) in enumerate(zip(tests, results)):
            if r.status in ("passed", "skipped") or shown >= self.max_feedback_tests:
                continue
            shown += 1
            if r.status == "compile_error":
                parts.append(f"The program does not compile:\n{_tail_lines(r.error, 12, 800)}")
                break
            block = [f"Test {i + 1}: {_STATUS_TITLE.get(r.status, r.status)}."]
            if r.status == "timeout":
                block[0] = f"Test {i + 1}: {r.error}."
            block.append(f"Input:\n{_truncate(test['input'].rstrip(), fc)}")
            block.append(f"Expected output:\n{_truncate(test['output'].rstrip(), fc)}")
            if r.status == "wrong_answer":
                label = "Your returned value" if testtype == "functional" else "Your output"
                block.append(f"{label}:\n{_truncate(r.actual.rstrip(), fc) if r.actual.strip() else '(empty)'}")
                if r.error:
                    block.append(f"Note: {r.error}")
            elif r.status == "runtime_error":
                block.append(f"Error:\n{_tail_lines(r.error, 12, 800)}")
            elif r.status in ("memory_limit", "output_limit", "sandbox_error") and r.error:
                block.append(f"Error:\n{_tail_lines(r.error, 6, 400)}")
            parts.append("\n".join(block))
        n_skip = sum(r.status == "skipped" for r in results)
        if n_skip:
            parts.append(f"{n_skip} tests were not run ({next(r.error for r in results if r.status == 'skipped')}).")
        text = "\n\n".join(parts)
        if len(text) > self.max_feedback_chars:
            text = text[: self.max_feedback_chars - 15] + "\n...(truncated)"
        return text

    def grade(self, example: TaskExample, response: str) -> Grade:
        ref = example.reference
        tests = ref["tests"]
        code = extract_code(response)
        if code is None or not code.strip():
            return Grade(reward=0.0, correct=False, score=0.0,
                         feedback="No code found: the response has no ```python code block.", answer=None,
                         details={"statuses": [], "n_passed": 0, "n_tests": len(tests), "has_code": False})
        t0 = time.monotonic()
        results = self.run_tests(code, ref)
        n_pass = sum(r.status == "passed" for r in results)
        n = len(results)
        correct = n > 0 and n_pass == n
        return Grade(
            reward=1.0 if correct else 0.0,
            correct=correct,
            score=n_pass / n if n else 0.0,
            feedback=self._feedback(tests, results, ref["testtype"]),
            answer=None,
            details={
                "statuses": [r.status for r in results],
                "test_wall_s": [round(r.wall_s, 4) for r in results],
                "n_passed": n_pass,
                "n_tests": n,
                "has_code": True,
                "sandbox_error": any(r.status == "sandbox_error" for r in results),
                "wall_s": time.monotonic() - t0,
            },
        )


def make_task(**kwargs: Any) -> LiveCodeBenchTask:
    return LiveCodeBenchTask(**kwargs)
