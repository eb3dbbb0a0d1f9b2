"""Grading a program by running it on tests, in the sandbox: no dataset needed.

    from distil_ray.feedback.code import ExecutionLimits, check_program
    v = check_program("print(int(input()) * 2)", [{"input": "2\n", "output": "4\n"}],
                      limits=ExecutionLimits(timeout_s=2))
    v.correct, v.score, v.statuses, v.feedback

* :mod:`.driver`: the program the sandbox runs per test (stdin or functional, LeetCode-style);
* :mod:`.compare`: whether the output is right (the official LiveCodeBench rules);
* :mod:`.harness`: :func:`run_tests` (one :class:`TestResult` per test, under
  :class:`ExecutionLimits`) and :func:`check_program` (plus the :class:`Verdict`);
* :mod:`.report`: per-test results → the feedback text (:class:`FeedbackFormat`).

Every execution goes through :class:`distil_ray.feedback.sandbox.Sandbox`: by default one sandbox
per response (a session: one process per test forked inside it), or one per test
(``ExecutionLimits(execution="per_test")``); see :mod:`.harness`. Outputs are compared here, never
inside the sandbox.
"""

from .compare import compare_functional, compare_stdout
from .driver import COMPILE_ERROR_EXIT, PRELUDE, SOLUTION_FILE, TESTTYPES, build_driver
from .harness import ExecutionLimits, Verdict, check_program, run_test, run_tests
from .report import FeedbackFormat, feedback_text
from .results import TEST_STATUSES, TestResult

__all__ = [
    "COMPILE_ERROR_EXIT",
    "PRELUDE",
    "SOLUTION_FILE",
    "TESTTYPES",
    "TEST_STATUSES",
    "ExecutionLimits",
    "FeedbackFormat",
    "TestResult",
    "Verdict",
    "build_driver",
    "check_program",
    "compare_functional",
    "compare_stdout",
    "feedback_text",
    "run_test",
    "run_tests",
]
