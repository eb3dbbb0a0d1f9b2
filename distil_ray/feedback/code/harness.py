"""Running one program against its tests, each in its own sandboxed process.

:func:`run_tests` runs ``code`` on every test (under :mod:`.driver`, compared by
:mod:`.compare`) and returns one :class:`TestResult` per test; :func:`check_program` adds the
verdict and the feedback text (:mod:`.report`). Each test runs under ``timeout_s`` (never past
what is left of ``total_timeout_s``), the sandbox's memory and process limits, and an output cap
(``max_output_bytes``, default: twice the expected output, at least 1 MiB). Tests still unrun
when ``total_timeout_s`` runs out are ``skipped``; so are the tests after a compile error, and
with ``stop_on_first_failure`` those after the first failure.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from distil_ray.feedback.sandbox import Sandbox, SandboxLimits, SandboxSettings

from .compare import STDOUT_COMPARES, compare_functional, compare_stdout
from .driver import COMPILE_ERROR_EXIT, TESTTYPES, build_driver, new_marker
from .report import FeedbackFormat, feedback_text
from .results import TestResult

# Left of the total budget below which no further test is started.
_MIN_TEST_BUDGET_S = 0.05


@dataclass(frozen=True)
class ExecutionLimits:
    """The limits of running one program's tests. ``sandbox`` holds the memory, file and process
    limits of each test's run (its ``timeout_s`` and ``max_output_bytes`` are set per test from
    the fields here); ``settings`` how the sandbox contains it."""

    timeout_s: float = 6.0  # each test (the official harness's limit)
    total_timeout_s: float = 60.0  # all tests of one program together
    max_output_bytes: int | None = None  # per stream; None: 2 x the expected output, at least 1 MiB
    stop_on_first_failure: bool = False
    stdout_compare: str = "decimal"  # how a stdin test's output is judged (compare.py: STDOUT_COMPARES)
    sandbox: SandboxLimits = field(default_factory=lambda: SandboxLimits(memory_mb=2048))
    settings: SandboxSettings = field(default_factory=SandboxSettings)

    def __post_init__(self) -> None:
        for name in ("timeout_s", "total_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be positive")
        if self.stdout_compare not in STDOUT_COMPARES:
            raise ValueError(f"stdout_compare={self.stdout_compare!r}: must be one of {', '.join(STDOUT_COMPARES)}")
        if self.max_output_bytes is not None and self.max_output_bytes <= 0:
            raise ValueError(f"max_output_bytes={self.max_output_bytes!r}: must be positive (or None)")

    def sandbox_for(self, expected_output: str, timeout_s: float) -> Sandbox:
        cap = self.max_output_bytes or max(1 << 20, 2 * len(expected_output.encode()) + (1 << 16))
        return Sandbox(replace(self.sandbox, timeout_s=timeout_s, max_output_bytes=cap), self.settings)


@dataclass(frozen=True)
class Verdict:
    """A program's results on its tests, and the feedback text made of them."""

    results: tuple[TestResult, ...]
    feedback: str
    wall_s: float  # running all the tests

    @property
    def n_tests(self) -> int:
        return len(self.results)

    @property
    def n_passed(self) -> int:
        return sum(r.status == "passed" for r in self.results)

    @property
    def correct(self) -> bool:
        return self.n_tests > 0 and self.n_passed == self.n_tests

    @property
    def score(self) -> float:
        return self.n_passed / self.n_tests if self.n_tests else 0.0

    @property
    def statuses(self) -> list[str]:
        return [r.status for r in self.results]


def run_test(sandbox: Sandbox, driver: str, test: Mapping[str, str], testtype: str, marker: str,
             stdout_compare: str = "decimal") -> TestResult:
    """One test: ``driver`` (from :func:`.driver.build_driver` with ``marker``) on ``test["input"]``,
    its output compared with ``test["output"]`` (stdin tests by ``stdout_compare``)."""
    res = sandbox.run(driver, test["input"])
    wall = float(getattr(res, "wall_s", 0.0) or 0.0)
    stdout, stderr = res.stdout or "", res.stderr or ""
    if res.status == "ok":
        if testtype == "stdin":
            ok = compare_stdout(stdout, test["output"], mode=stdout_compare)
            return TestResult("passed" if ok else "wrong_answer", actual=stdout, wall_s=wall)
        lines = [ln[len(marker):] for ln in stdout.split("\n") if ln.startswith(marker)]
        if not lines:
            return TestResult("runtime_error", error="the program exited before returning a result", wall_s=wall)
        out = lines[-1]
        if out.startswith("!"):
            return TestResult("wrong_answer", actual=out[1:], error="the returned value is not JSON-serializable", wall_s=wall)
        ok = compare_functional(out, test["output"])
        return TestResult("passed" if ok else "wrong_answer", actual=out, wall_s=wall)
    if res.status == "runtime_error":
        status = "compile_error" if getattr(res, "returncode", None) == COMPILE_ERROR_EXIT else "runtime_error"
        error = stderr.strip() or f"the program exited with code {getattr(res, 'returncode', '?')}"
        return TestResult(status, actual=stdout if testtype == "stdin" else "", error=error, wall_s=wall)
    if res.status == "timeout":
        return TestResult("timeout", error=f"time limit exceeded ({sandbox.limits.timeout_s:g} s)", wall_s=wall)
    if res.status in ("memory_limit", "output_limit"):
        return TestResult(res.status, actual=stdout if testtype == "stdin" else "", error=stderr.strip(), wall_s=wall)
    return TestResult("sandbox_error", error=stderr.strip() or str(res.status), wall_s=wall)


def run_tests(code: str, tests: Sequence[Mapping[str, str]], *, testtype: str = "stdin",
              func_name: str | None = None, limits: ExecutionLimits = ExecutionLimits()) -> list[TestResult]:
    """``code`` on each of ``tests`` (``{"input", "output"}`` texts) in order: one result per test.

    ``testtype``: ``"stdin"`` or ``"functional"`` (then ``func_name`` names the method of class
    ``Solution``, or the function, to call)."""
    if testtype not in TESTTYPES:
        raise ValueError(f"testtype={testtype!r}: allowed values are {', '.join(map(repr, TESTTYPES))}")
    if testtype == "functional" and not func_name:
        raise ValueError("func_name: functional tests need the name of the function to call")
    marker = new_marker()
    driver = build_driver(code, testtype, func_name, marker)
    results: list[TestResult] = []
    t0 = time.monotonic()
    for i, test in enumerate(tests):
        left = limits.total_timeout_s - (time.monotonic() - t0)
        if left <= _MIN_TEST_BUDGET_S:
            results += [TestResult("skipped", error="total time budget exhausted")] * (len(tests) - i)
            break
        r = run_test(limits.sandbox_for(test["output"], min(limits.timeout_s, left)), driver, test, testtype, marker,
                     limits.stdout_compare)
        if r.status == "timeout" and left < limits.timeout_s:
            r = replace(r, error=f"total time budget of {limits.total_timeout_s:g} s exhausted")
        results.append(r)
        if r.status == "compile_error" or (limits.stop_on_first_failure and r.status != "passed"):
            why = "the program does not compile" if r.status == "compile_error" else "stopped at the first failure"
            results += [TestResult("skipped", error=why)] * (len(tests) - i - 1)
            break
    return results


def check_program(code: str, tests: Sequence[Mapping[str, str]], *, testtype: str = "stdin",
                  func_name: str | None = None, limits: ExecutionLimits = ExecutionLimits(),
                  fmt: FeedbackFormat = FeedbackFormat()) -> Verdict:
    """:func:`run_tests`, with the verdict and the feedback text."""
    t0 = time.monotonic()
    results = run_tests(code, tests, testtype=testtype, func_name=func_name, limits=limits)
    feedback = feedback_text(tests, results, testtype, fmt)
    return Verdict(tuple(results), feedback, time.monotonic() - t0)
