"""Per-test results → the feedback text a teacher reads: a summary line, then the first failing
tests (at most ``max_tests``) with input / expected / actual output, or the traceback's last lines,
or the limit that was hit; at most ``max_chars`` characters in all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .results import TestResult


@dataclass(frozen=True)
class FeedbackFormat:
    max_tests: int = 2  # failing tests shown in detail
    max_chars: int = 2000  # the whole text
    field_chars: int = 300  # each input / expected / actual field (middle elided)


_STATUS_TITLE = {
    "wrong_answer": "wrong answer",
    "runtime_error": "runtime error",
    "compile_error": "the program does not compile",
    "timeout": "time limit exceeded",
    "memory_limit": "memory limit exceeded",
    "output_limit": "output limit exceeded",
    "sandbox_error": "the grader could not run the program",
}


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = max(1, (limit - 20) // 2)
    return f"{text[:half]}\n...(truncated)...\n{text[-half:]}"


def _tail_lines(text: str, n_lines: int, limit: int) -> str:
    lines = text.rstrip().splitlines()[-n_lines:]
    out = "\n".join(lines)
    return out if len(out) <= limit else "..." + out[-(limit - 3):]


def _failure_block(i: int, test: Mapping[str, str], r: TestResult, testtype: str, fc: int) -> str:
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
    return "\n".join(block)


def feedback_text(tests: Sequence[Mapping[str, str]], results: Sequence[TestResult], testtype: str = "stdin",
                  fmt: FeedbackFormat = FeedbackFormat()) -> str:
    """The feedback for one program: ``tests[i]`` (``input``, ``output``) ran as ``results[i]``."""
    n, n_pass = len(results), sum(r.status == "passed" for r in results)
    if n_pass == n:
        return f"All {n} tests passed."
    parts = [f"Passed {n_pass}/{n} tests."]
    shown = 0
    for i, (test, r) in enumerate(zip(tests, results)):
        if r.status in ("passed", "skipped") or shown >= fmt.max_tests:
            continue
        shown += 1
        if r.status == "compile_error":
            parts.append(f"The program does not compile:\n{_tail_lines(r.error, 12, 800)}")
            break
        parts.append(_failure_block(i, test, r, testtype, fmt.field_chars))
    n_skip = sum(r.status == "skipped" for r in results)
    if n_skip:
        parts.append(f"{n_skip} tests were not run ({next(r.error for r in results if r.status == 'skipped')}).")
    text = "\n\n".join(parts)
    if len(text) > fmt.max_chars:
        text = text[: fmt.max_chars - 15] + "\n...(truncated)"
    return text
