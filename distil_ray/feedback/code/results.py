"""The outcome of one test of a program (shared by the runner and the feedback text)."""

from __future__ import annotations

from dataclasses import dataclass

# passed, or why not; "skipped": never run (compile error, stop at the first failure, time budget)
TEST_STATUSES = ("passed", "wrong_answer", "runtime_error", "compile_error", "timeout", "memory_limit",
                 "output_limit", "sandbox_error", "skipped")


@dataclass(frozen=True)
class TestResult:
    __test__ = False  # (not a pytest test class, despite the name)

    status: str  # one of TEST_STATUSES
    actual: str = ""  # the program's output (stdin) or returned value as JSON (functional)
    error: str = ""  # traceback, limit message, or a note on the returned value
    wall_s: float = 0.0
