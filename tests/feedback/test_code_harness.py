"""The code-execution harness on its own, without any dataset: per-test verdicts and the exact
feedback text for right, wrong, crashing, non-compiling, functional and looping programs."""

from __future__ import annotations

import pytest

from distil_ray.feedback.code import (
    ExecutionLimits,
    FeedbackFormat,
    TestResult,
    check_program,
    feedback_text,
    run_tests,
)
from distil_ray.feedback.sandbox import SandboxLimits

pytestmark = pytest.mark.timeout(60)

SUM_TESTS = [
    {"input": "1 2\n", "output": "3\n"},
    {"input": "2 2\n", "output": "4\n"},
    {"input": "5 5\n", "output": "10\n"},
]
SUM_OK = "a, b = map(int, input().split())\nprint(a + b)\n"
LIMITS = ExecutionLimits(timeout_s=5.0, sandbox=SandboxLimits(memory_mb=512))


def test_correct_stdin_program_passes_every_test():
    v = check_program(SUM_OK, SUM_TESTS, limits=LIMITS)
    assert v.statuses == ["passed"] * 3
    assert (v.correct, v.score, v.n_passed, v.n_tests) == (True, 1.0, 3, 3)
    assert v.feedback == "All 3 tests passed."
    assert all(r.actual.strip() == t["output"].strip() for r, t in zip(v.results, SUM_TESTS))


def test_wrong_answer_on_the_second_test_shows_input_expected_and_actual():
    code = "a, b = map(int, input().split())\nprint(a * 3 if a == 2 else a + b)\n"
    v = check_program(code, SUM_TESTS, limits=LIMITS)
    assert v.statuses == ["passed", "wrong_answer", "passed"]
    assert not v.correct and v.score == pytest.approx(2 / 3)
    assert v.feedback == (
        "Passed 2/3 tests.\n\n"
        "Test 2: wrong answer.\nInput:\n2 2\nExpected output:\n4\nYour output:\n6"
    )


def test_runtime_error_gives_the_solutions_traceback():
    code = "a, b = map(int, input().split())\nprint(a // (b - b))\n"
    v = check_program(code, SUM_TESTS[:1], limits=LIMITS)
    assert v.statuses == ["runtime_error"]
    assert v.feedback.startswith("Passed 0/1 tests.\n\nTest 1: runtime error.\nInput:\n1 2\nExpected output:\n3\nError:\n")
    assert 'File "solution.py", line 2' in v.feedback and v.feedback.endswith("ZeroDivisionError: integer division or modulo by zero")
    assert "driver" not in v.feedback and "_exec" not in v.feedback  # only the solution's own frames


def test_compile_error_skips_the_remaining_tests():
    v = check_program("def broken(:\n    pass\n", SUM_TESTS, limits=LIMITS)
    assert v.statuses == ["compile_error", "skipped", "skipped"]
    assert v.feedback.startswith("Passed 0/3 tests.\n\nThe program does not compile:\n")
    assert "SyntaxError" in v.feedback
    assert v.feedback.endswith("\n\n2 tests were not run (the program does not compile).")


def test_functional_tests_call_the_solution_method():
    tests = [
        {"input": "[1, 2, 3]\n2", "output": "[3, 4, 5]"},
        {"input": "[]\n7", "output": "[]"},
        {"input": "[5]\n-5", "output": "[1]"},
    ]
    code = (
        "class Solution:\n"
        "    def shift(self, nums: List[int], k: int) -> List[int]:\n"
        "        print('ignored')\n"
        "        return tuple(x + k for x in nums)\n"
    )
    v = check_program(code, tests, testtype="functional", func_name="shift", limits=LIMITS)
    assert v.statuses == ["passed", "passed", "wrong_answer"]
    assert v.results[2].actual == "[0]"
    assert v.feedback == (
        "Passed 2/3 tests.\n\n"
        "Test 3: wrong answer.\nInput:\n[5]\n-5\nExpected output:\n[1]\nYour returned value:\n[0]"
    )
    missing = check_program(code.replace("def shift", "def other"), tests[:1], testtype="functional",
                            func_name="shift", limits=LIMITS)
    assert missing.statuses == ["runtime_error"] and "AttributeError" in missing.feedback
    with pytest.raises(ValueError, match="^func_name"):
        run_tests(code, tests, testtype="functional")


def test_timeouts_and_the_total_budget():
    loop = "while True:\n    pass\n"
    stop = ExecutionLimits(timeout_s=1.0, stop_on_first_failure=True, sandbox=SandboxLimits(memory_mb=512))
    v = check_program(loop, SUM_TESTS, limits=stop)
    assert v.statuses == ["timeout", "skipped", "skipped"]
    assert v.feedback == (
        "Passed 0/3 tests.\n\n"
        "Test 1: time limit exceeded (1 s).\nInput:\n1 2\nExpected output:\n3\n\n"
        "2 tests were not run (stopped at the first failure)."
    )
    budget = ExecutionLimits(timeout_s=1.0, total_timeout_s=1.5, sandbox=SandboxLimits(memory_mb=512))
    v = check_program(loop, SUM_TESTS, limits=budget)
    assert v.statuses[0] == "timeout" and v.statuses[-1] == "skipped" and set(v.statuses) <= {"timeout", "skipped"}
    assert "total time budget" in v.feedback and v.wall_s < 6


def test_output_cap():
    limits = ExecutionLimits(timeout_s=5.0, max_output_bytes=1000, sandbox=SandboxLimits(memory_mb=512))
    (r,) = run_tests("print('x' * 100000)\n", SUM_TESTS[:1], limits=limits)
    assert r.status == "output_limit"


def test_feedback_text_alone():
    tests = [{"input": "i" * 50, "output": "o\n"}, {"input": "2", "output": "4"}, {"input": "3", "output": "9"}]
    results = [TestResult("wrong_answer", actual=""), TestResult("memory_limit", error="MemoryError"),
               TestResult("skipped", error="total time budget exhausted")]
    text = feedback_text(tests, results, "stdin", FeedbackFormat(max_tests=1, field_chars=30))
    assert text == (
        "Passed 0/3 tests.\n\n"
        f"Test 1: wrong answer.\nInput:\n{'i' * 5}\n...(truncated)...\n{'i' * 5}\nExpected output:\no\n"
        "Your output:\n(empty)\n\n"
        "1 tests were not run (total time budget exhausted)."
    )
    assert feedback_text(tests, results, "stdin", FeedbackFormat(max_chars=40)).endswith("\n...(truncated)")
    assert len(feedback_text(tests, results, "stdin", FeedbackFormat(max_chars=40))) == 40


def test_limits_are_checked():
    with pytest.raises(ValueError, match="^timeout_s=0"):
        ExecutionLimits(timeout_s=0)
    with pytest.raises(ValueError, match="^max_output_bytes=-1"):
        ExecutionLimits(max_output_bytes=-1)
    with pytest.raises(ValueError, match="^testtype='python'"):
        run_tests(SUM_OK, SUM_TESTS, testtype="python")
