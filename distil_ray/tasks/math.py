r"""Competition math (AIME, AMC, HMMT, Minerva, ...): boxed final answers checked with math-verify.

Sources
-------
A *source* is one dataset; ``load(name)`` loads it, ``load("train")`` / ``load("test")`` load the
configured training / evaluation sources. Each source is read from ``{data_dir}/{name}/test.jsonl``
(or ``train.jsonl``) when that file exists, from an explicit file given in ``files``, or else from
the hub (``datasets.load_dataset(hub_name, split=...)``; see :data:`HUB_SOURCES`).

Records differ per source and are normalised by :func:`normalize_record`: the problem is the first
of ``problem`` / ``question``; the reference answer is ``answer`` (strings, ints and floats such as
AMC's ``27.0`` → ``"27"``) or else the last ``\boxed{}`` of ``solution``. A full worked
``solution`` (longer than the box) is kept as ``reference["solution"]`` for teachers that condition
on it (OPSD).

Grading
-------
The student's answer is the content of the last ``\boxed{...}`` (or ``\fbox{...}``) with nested
braces matched. It is correct if its normalised string equals the reference's
(:func:`normalize_answer`) or if ``math_verify.verify(parse(gold), parse(pred))`` holds. The
math-verify call runs under a wall-clock limit that works from any thread: by default in a
persistent helper process that is killed and restarted on a timeout (so even a computation stuck
inside C code, e.g. ``\boxed{9^{9^{9^{9}}}}``, cannot hold the caller), or, with
``isolation="thread"``, in a helper thread that is abandoned on a timeout. math-verify's own
``signal.alarm`` timeouts are disabled (they only work in the main thread). When math-verify fails
or times out, the string comparison decides.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distil_ray.tasks.base import DataFormatError, Grade, TaskExample, find_record_file, iter_records

__all__ = [
    "INSTRUCTION",
    "HUB_SOURCES",
    "LOCAL_SOURCES",
    "MathTask",
    "MathVerifyTimeout",
    "answer_to_str",
    "answers_match",
    "extract_boxed",
    "last_boxed",
    "math_verify_equal",
    "normalize_answer",
    "normalize_record",
]

logger = logging.getLogger(__name__)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


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


# ----------------------------------------------------------------------------------------------
# answer extraction and normalisation

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> list[str]:
    r"""Contents of every complete ``\boxed{...}`` / ``\fbox{...}`` in order, braces matched.

    ``\boxed 5`` (no braces) yields ``"5"``; a box whose braces never close (a truncated response)
    is skipped.
    """
    out: list[tuple[int, str]] = []
    for cmd in _BOX_COMMANDS:
        start = 0
        while True:
            i = text.find(cmd, start)
            if i < 0:
                break
            start = i + len(cmd)
            j = start
            if j < len(text) and text[j].isalpha():  # another command, e.g. \boxedx
                continue
            while j < len(text) and text[j] == " ":
                j += 1
            if j < len(text) and text[j] == "{":
                depth, k = 0, j
                while k < len(text):
                    ch = text[k]
                    if ch == "\\" and k + 1 < len(text) and text[k + 1] in "{}":
                        k += 2  # an escaped brace \{ or \} does not count
                        continue
                    if ch == "{":
                        depth += 1
                    elif ch == "}":
                        depth -= 1
                        if depth == 0:
                            out.append((i, text[j + 1 : k]))
                            break
                    k += 1
            elif j > start:  # "\boxed 5": one token up to whitespace or '$'
                m = re.match(r"[^\s$]+", text[j:])
                if m:
                    out.append((i, m.group(0)))
    return [content for _, content in sorted(out)]


def last_boxed(text: str) -> str | None:
    r"""The content of the last complete ``\boxed{}`` / ``\fbox{}``, or ``None``."""
    boxes = extract_boxed(text)
    return boxes[-1] if boxes else None


def _unwrap(s: str, commands: Sequence[str]) -> str:
    """Replace ``\\cmd{X}`` by ``X`` (innermost first, brace-free contents), repeatedly."""
    pattern = re.compile(r"\\(?:%s)\s*\{([^{}]*)\}" % "|".join(commands))
    while True:
        new = pattern.sub(r"\1", s)
        if new == s:
            return s
        s = new


_INT = re.compile(r"[+-]?\d+(?:\.0*)?")


def normalize_answer(answer: Any) -> str:
    r"""A canonical string for comparing final answers.

    Strips ``$``, spaces and LaTeX spacing (``\!``, ``\,``, ``\;``, ``\:``, ``~``), ``\left`` /
    ``\right``, ``\text{}``-like wrappers, degree marks (``^\circ``), trailing periods; maps
    ``\dfrac`` / ``\tfrac`` to ``\frac``; writes integers without leading zeros or ``.0``.
    """
    s = str(answer).strip()
    s = s.strip("$")
    s = _unwrap(s, ("text", "textbf", "textit", "mathrm", "mathbf", "mbox", "boxed"))
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\[!,;:> ]", "", s)
    s = s.replace("~", "")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°", "", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    s = s.strip("$")
    # AoPS-style choice answers box the number in parentheses: \textbf{(073)}
    s = re.sub(r"^\((-?\d+)\)$", r"\1", s)
    if _INT.fullmatch(s):
        sign = "-" if s.startswith("-") else ""
        digits = s.lstrip("+-").split(".")[0].lstrip("0") or "0"
        s = "0" if digits == "0" else sign + digits
    return s


def answer_to_str(value: Any) -> str:
    """A reference answer as text: integral floats lose their ``.0`` (AMC stores ``27.0``)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


# ----------------------------------------------------------------------------------------------
# math-verify under a wall-clock limit


class MathVerifyTimeout(TimeoutError):
    """math-verify did not finish within the time limit."""


_SCIENTIFIC = re.compile(r"\s*([+-]?\d+(?:\.\d*)?)\s*[eE]\s*([+-]?\d+)\s*")


def _scientific_to_latex(answer: str) -> str:
    """``4.5e33`` -> ``4.5\\times10^{33}`` (math-verify reads a bare ``e`` as Euler's number)."""
    m = _SCIENTIFIC.fullmatch(answer)
    return f"{m.group(1)}\\times10^{{{m.group(2)}}}" if m else answer


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once that its own timeouts are off; here the caller enforces the limit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_warning_filter_installed = False


def _quiet_disabled_timeout_warning() -> None:
    global _warning_filter_installed
    if not _warning_filter_installed:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropDisabledTimeoutWarning())
        _warning_filter_installed = True


def math_verify_equal(gold: str, pred: str) -> bool | None:
    """``verify(parse(gold), parse(pred))`` on boxed answers, without math-verify's signal timeouts.

    Answers in e-notation (Minerva writes ``4.5e33``) are rewritten as powers of ten first.
    ``None`` when either side does not parse (the caller then relies on string comparison).
    """
    from math_verify import parse, verify

    _quiet_disabled_timeout_warning()
    gold_parsed = parse("\\boxed{" + _scientific_to_latex(gold) + "}", parsing_timeout=None)
    pred_parsed = parse("\\boxed{" + _scientific_to_latex(pred) + "}", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return None
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


class _Abandoned(BaseException):
    """Raised asynchronously inside a helper thread whose result nobody waits for any more."""


def _run_in_thread(fn, args: tuple, timeout_s: float):
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn(*args)
        except _Abandoned:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, name="math-verify", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        # Best effort: stops the thread at its next Python bytecode (not inside a long C call).
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Abandoned))
        raise MathVerifyTimeout(f"math-verify took longer than {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


_WORKER_CODE = "from distil_ray.tasks.math import _verify_worker_main; _verify_worker_main()"


def _verify_worker_main() -> None:
    """Helper process: one JSON request per stdin line, one JSON reply per stdout line."""
    logging.disable(logging.CRITICAL)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    import math_verify  # noqa: F401 - pay the import before announcing readiness

    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            reply = {"ok": math_verify_equal(req["gold"], req["pred"])}
        except Exception as e:  # noqa: BLE001 - reported to the parent
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _VerifyProcess:
    """A persistent helper process running :func:`math_verify_equal`; killed and restarted on timeout.

    One per Python process (shared by all tasks); concurrent callers take turns.
    """

    def __init__(self, startup_timeout_s: float = 120.0):
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._lock = threading.Lock()
        self.restarts = 0

    def _start(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._buf = b""
        try:
            ready = self._read_line(self.startup_timeout_s)
        except MathVerifyTimeout:
            self._kill()
            raise RuntimeError("the math-verify helper process did not start") from None
        if json.loads(ready).get("ready") is not True:
            self._kill()
            raise RuntimeError(f"unexpected greeting from the math-verify helper process: {ready!r}")

    def _read_line(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MathVerifyTimeout(f"math-verify took longer than {timeout_s:g} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self._kill()
                raise RuntimeError("the math-verify helper process exited unexpectedly")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                stream.close()
            self._proc = None

    def call(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                if self._proc is not None:
                    self._kill()
                self._start()
            try:
                self._proc.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode())
                self._proc.stdin.flush()
                reply = json.loads(self._read_line(timeout_s))
            except MathVerifyTimeout:
                self._kill()
                self.restarts += 1
                raise
            except (BrokenPipeError, OSError) as e:
                self._kill()
                raise RuntimeError(f"the math-verify helper process failed: {e}") from None
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["ok"]

    def close(self) -> None:
        with self._lock:
            self._kill()


_process_verifier: _VerifyProcess | None = None
_process_verifier_lock = threading.Lock()


def _get_process_verifier() -> _VerifyProcess:
    global _process_verifier
    with _process_verifier_lock:
        if _process_verifier is None:
            _process_verifier = _VerifyProcess()
            atexit.register(_process_verifier.close)
        return _process_verifier


def answers_match(
    gold: str, pred: str, timeout_s: float = 10.0, isolation: str = "process"
) -> tuple[bool, dict[str, Any]]:
    """Whether ``pred`` is an acceptable final answer for ``gold``, and how that was decided.

    Normalised string equality first (cheap, never wrong when it holds); otherwise math-verify
    under ``timeout_s`` (``isolation``: ``"process"`` or ``"thread"``). The details dict has
    ``method`` (``"string"`` / ``"math_verify"``), ``math_verify`` (its verdict, ``None`` if it
    did not parse or failed), ``timed_out`` and ``error``.
    """
    details: dict[str, Any] = {"method": "string", "math_verify": None, "timed_out": False, "error": None}
    if normalize_answer(gold) == normalize_answer(pred):
        return True, details
    if isolation not in ("process", "thread"):
        raise ValueError(f"isolation must be 'process' or 'thread', got {isolation!r}")
    try:
        if isolation == "process":
            verdict = _get_process_verifier().call(gold, pred, timeout_s)
        else:
            verdict = _run_in_thread(math_verify_equal, (gold, pred), timeout_s)
    except MathVerifyTimeout:
        details["timed_out"] = True
        return False, details
    except Exception as e:  # noqa: BLE001 - any failure falls back to the string comparison
        details["error"] = f"{type(e).__name__}: {e}"
        return False, details
    details["math_verify"] = verdict
    if verdict is None:
        return False, details
    details["method"] = "math_verify"
    return bool(verdict), details


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


# ----------------------------------------------------------------------------------------------
# the task


class MathTask:
    r"""Boxed-answer math. ``load(split)``: ``"train"``, ``"test"`` or a source name.

    ``train`` / ``test``: source names loaded for those splits. ``data_dir``: folder with
    ``{source}/test.jsonl`` (or ``train.jsonl``). ``files``: extra sources as ``{name: path}``
    (JSON lines, any supported schema). ``hub``: overrides / additions to :data:`HUB_SOURCES`
    (``{name: "owner/dataset"}`` or ``{name: {"name": ..., "split": ..., "config": ...}}``).
    ``timeout_s`` / ``isolation``: the math-verify time limit (see :func:`answers_match`).
    ``reveal_answer=True`` adds the reference answer to the feedback of wrong answers.
    """

    name = "math"

    def __init__(
        self,
        train: str | Sequence[str] = ("openthoughts_math",),
        test: str | Sequence[str] = ("aime24", "amc23", "minerva_math"),
        data_dir: str | Path | None = None,
        files: Mapping[str, str | Path] | None = None,
        hub: Mapping[str, Any] | None = None,
        instruction: str = INSTRUCTION,
        system_prompt: str | None = None,
        timeout_s: float = 10.0,
        isolation: str = "process",
        reveal_answer: bool = False,
    ):
        self.splits = {
            "train": [train] if isinstance(train, str) else list(train),
            "test": [test] if isinstance(test, str) else list(test),
        }
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.files = {k: Path(v) for k, v in (files or {}).items()}
        self.hub = dict(HUB_SOURCES)
        for key, spec in (hub or {}).items():
            if isinstance(spec, str):
                spec = HubSource(spec)
            elif isinstance(spec, Mapping):
                spec = HubSource(**spec)
            self.hub[key] = spec
        if isolation not in ("process", "thread"):
            raise ValueError(f"isolation must be 'process' or 'thread', got {isolation!r}")
        self.instruction = instruction
        self.system_prompt = system_prompt
        self.timeout_s, self.isolation = float(timeout_s), isolation
        self.reveal_answer = reveal_answer
        for split, names in self.splits.items():
            for source in names:
                if source not in self.sources():
                    raise ValueError(f"unknown math source {source!r} in {split}; valid sources: {', '.join(self.sources())}")

    def sources(self) -> list[str]:
        names = list(self.files) + list(self.hub) + list(LOCAL_SOURCES)
        if self.data_dir is not None and self.data_dir.is_dir():
            names += [p.name for p in sorted(self.data_dir.iterdir()) if p.is_dir()]
        return sorted(set(names))

    # -- loading ----------------------------------------------------------------------------

    def load(self, split: str) -> list[TaskExample]:
        if split in self.splits:
            return [ex for source in self.splits[split] for ex in self.load_source(source, split)]
        if split in self.sources():
            return self.load_source(split, split)
        raise ValueError(
            f"unknown math split {split!r}; valid: 'train', 'test' or a source ({', '.join(self.sources())})"
        )

    def _local_file(self, source: str) -> Path | None:
        if source in self.files:
            return self.files[source]
        if self.data_dir is not None:
            for name in ("test", "train"):
                path = find_record_file(self.data_dir / source / name)
                if path is not None:
                    return path
        return None

    def load_source(self, source: str, split: str) -> list[TaskExample]:
        path = self._local_file(source)
        if path is not None:
            return self.load_file(path, source, split)
        if source not in self.hub:
            raise FileNotFoundError(
                f"math source {source!r} has no local file (data_dir={self.data_dir}) and no hub name"
            )
        spec = self.hub[source]
        from datasets import load_dataset

        ds = load_dataset(spec.name, spec.config, split=spec.split) if spec.config else load_dataset(spec.name, split=spec.split)
        examples = []
        for i, rec in enumerate(ds):
            try:
                examples.append(self.to_example(rec, source, split, index=i))
            except ValueError as e:
                raise ValueError(f"{spec.name} ({spec.split}) row {i}: {e}") from None
        return examples

    def load_file(self, path: str | Path, source: str, split: str = "test") -> list[TaskExample]:
        """Examples from a JSON-lines or Parquet file of any supported schema (errors name file and line)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"math data file not found: {path}")
        examples = []
        for i, (line_no, rec) in enumerate(iter_records(path)):
            try:
                examples.append(self.to_example(rec, source, split, index=i))
            except ValueError as e:
                raise DataFormatError(path, line_no, str(e)) from None
        return examples

    def to_example(self, record: Mapping[str, Any], source: str, split: str, index: int) -> TaskExample:
        norm = normalize_record(record)
        rid = norm["id"] if norm["id"] is not None else index
        user = norm["problem"].rstrip() + "\n" + self.instruction if self.instruction else norm["problem"]
        messages = [{"role": "user", "content": user}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        reference = {"answer": norm["answer"]}
        if norm["solution"] is not None:
            reference["solution"] = norm["solution"]
        # "domain" is the label the evaluation groups by (val/domain/<source>/...): a test split of
        # several sources (AIME24 + AIME25 + HMMT25) is reported per source as well as pooled
        meta = {"source": source, "domain": source, "split": split, "id": rid}
        for key in ("type", "problem_type", "level", "subject", "url"):
            if record.get(key) is not None:
                meta[key] = record[key]
        return TaskExample(uid=f"math/{source}/{rid}", task=self.name, messages=messages, reference=reference, meta=meta)

    # -- grading ----------------------------------------------------------------------------

    def grade(self, example: TaskExample, response: str) -> Grade:
        gold = example.reference["answer"]
        pred = last_boxed(response)
        if pred is None or not pred.strip():
            feedback = "No final answer found: put your final answer within \\boxed{}."
            if self.reveal_answer:
                feedback += f" The correct answer is {gold}."
            return Grade(0.0, False, 0.0, feedback, answer=None, details={"extracted": pred, "method": None})
        pred = pred.strip()
        correct, details = answers_match(gold, pred, timeout_s=self.timeout_s, isolation=self.isolation)
        if correct:
            feedback = f"Your final answer {pred} is correct."
        else:
            feedback = f"Your final answer {pred} is incorrect."
            if self.reveal_answer:
                feedback += f" The correct answer is {gold}."
        reward = 1.0 if correct else 0.0
        details["extracted"] = pred
        return Grade(reward, correct, reward, feedback, answer=normalize_answer(pred), details=details)
