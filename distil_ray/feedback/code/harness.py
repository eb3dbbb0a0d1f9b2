"""Running one program against its tests, each in its own sandboxed process.

:func:`run_tests` runs ``code`` on every test (under :mod:`.driver`, compared by
:mod:`.compare`) and returns one :class:`TestResult` per test; :func:`check_program` adds the
verdict and the feedback text (:mod:`.report`). Each test runs under ``timeout_s`` (never past
what is left of ``total_timeout_s``), the sandbox's memory and process limits, and an output cap
(``max_output_bytes``, default: twice the expected output, at least 1 MiB). Tests still unrun
when ``total_timeout_s`` runs out are ``skipped``; so are the tests after a compile error, and
with ``stop_on_first_failure`` those after the first failure.

``execution`` says how the tests are contained:

* ``"per_response"`` (default): one sandbox for all the tests of a response
  (:meth:`Sandbox.session`). The solution is compiled and the prelude imported once, in the
  sandbox's fork server; each test is a process forked from it, with its own process group, a
  fresh uid (run by root), the test's time, memory and output limits, and nothing left of the
  previous test (its processes are killed and the working directories wiped). The sandbox only
  ever receives the inputs: every output is compared here, outside it. A test that kills or
  stops the fork server ends that sandbox; the next test gets a new one.
  With ``warm_sandbox`` (default) a sandbox outlives its response (where its tests run as uids of
  their own: run by root): at the response's end its program is unloaded (its response server
  exits; the fork server forks a fresh one) and the sandbox waits, idle, for the next response of
  this process with the same limits. The start of
  bwrap and of the interpreter (~40 ms) is paid once per process, not per response; what the
  next response finds of the previous one is nothing (see :mod:`..sandbox.forkserver`).
* ``"per_test"``: one sandbox (bwrap, cgroup, interpreter) per test, as :meth:`Sandbox.run`.

Both give the same verdicts. ``parallel_tests`` > 1 runs that many tests at once (one sandbox
each, in threads); the results, the skipped tests and the feedback are those of a serial run.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from distil_ray.feedback.sandbox import Sandbox, SandboxLimits, SandboxResult, SandboxSettings
from distil_ray.feedback.sandbox.session import SandboxSession

from .compare import STDOUT_COMPARES, compare_functional, compare_stdout
from .driver import COMPILE_ERROR_EXIT, PRELOAD, TESTTYPES, build_driver, build_driver_parts, new_marker
from .report import FeedbackFormat, feedback_text
from .results import TestResult

# Left of the total budget below which no further test is started.
_MIN_TEST_BUDGET_S = 0.05
EXECUTION_MODES = ("per_response", "per_test")


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
    execution: str = "per_response"  # one sandbox per response, or "per_test" (see the module docstring)
    parallel_tests: int = 1  # tests of one response run at once
    warm_sandbox: bool = True  # per_response: a sandbox serves the next responses once this one is done

    def __post_init__(self) -> None:
        if self.execution not in EXECUTION_MODES:
            raise ValueError(f"execution={self.execution!r}: allowed values are {', '.join(map(repr, EXECUTION_MODES))}")
        if not isinstance(self.parallel_tests, int) or self.parallel_tests < 1:
            raise ValueError(f"parallel_tests={self.parallel_tests!r}: must be a positive integer")
        for name in ("timeout_s", "total_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be positive")
        if self.stdout_compare not in STDOUT_COMPARES:
            raise ValueError(f"stdout_compare={self.stdout_compare!r}: must be one of {', '.join(STDOUT_COMPARES)}")
        if self.max_output_bytes is not None and self.max_output_bytes <= 0:
            raise ValueError(f"max_output_bytes={self.max_output_bytes!r}: must be positive (or None)")

    def output_cap(self, expected_output: str) -> int:
        # (a power of two: the sandbox learns at most the expected output's order of magnitude)
        need = max(1 << 20, 2 * len(expected_output.encode()) + (1 << 16))
        return self.max_output_bytes or 1 << (need - 1).bit_length()

    def sandbox_for(self, expected_output: str, timeout_s: float) -> Sandbox:
        cap = self.output_cap(expected_output)
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
    return result_of_run(sandbox.run(driver, test["input"]), test, testtype, marker, sandbox.limits.timeout_s,
                         stdout_compare)


def result_of_run(res: SandboxResult, test: Mapping[str, str], testtype: str, marker: str,
                  timeout_s: float, stdout_compare: str = "decimal") -> TestResult:
    """A test's result from how its run ended: the output is compared here, outside the sandbox."""
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
        return TestResult("timeout", error=f"time limit exceeded ({timeout_s:g} s)", wall_s=wall)
    if res.status in ("memory_limit", "output_limit"):
        return TestResult(res.status, actual=stdout if testtype == "stdin" else "", error=stderr.strip(), wall_s=wall)
    return TestResult("sandbox_error", error=stderr.strip() or str(res.status), wall_s=wall)


# How one test's program runs: (test, time limit, output cap) -> how the run ended.
_Runner = Callable[[Mapping[str, str], float, int], SandboxResult]


class _SessionRunner:
    """Runs tests one after another in one sandbox session (``per_response``), opening a new
    session when a test broke the current one (it killed or stopped the fork server)."""

    def __init__(self, setup: str, run: str, limits: ExecutionLimits):
        self.setup, self.run, self.limits = setup, run, limits
        self.sandbox = Sandbox(replace(limits.sandbox, timeout_s=limits.timeout_s), limits.settings)
        self.session: SandboxSession | None = None

    def __call__(self, test: Mapping[str, str], timeout_s: float, cap: int) -> SandboxResult:
        if self.session is None:
            self.session = _take_session(self.sandbox, self.limits.warm_sandbox)
            self.session.load(self.run, setup=self.setup)
        res = self.session.run(test["input"], timeout_s=timeout_s, max_output_bytes=cap)
        if self.session.broken:
            self.close()
        return res

    def close(self) -> None:
        if self.session is not None:
            _give_back(self.session, self.sandbox, self.limits.warm_sandbox)
            self.session = None


# The warm sandboxes of this process, idle between responses, per (limits, settings); never
# shared with a forked copy of the process (each session checks its owner's pid, and the copy
# starts with none).
_MAX_IDLE = 4  # per (limits, settings): enough for parallel_tests workers and a few graders
_idle: dict[str, list[SandboxSession]] = {}
_idle_lock = threading.Lock()


def _key(sandbox: Sandbox) -> str:
    return repr((sandbox.limits, sandbox.settings))


def _take_session(sandbox: Sandbox, warm: bool) -> SandboxSession:
    """A session with no program for one response: with ``warm``, an idle one that an earlier
    response gave back (its program unloaded), else a new one."""
    if warm:
        while True:
            with _idle_lock:
                pool = _idle.get(_key(sandbox))
                session = pool.pop() if pool else None
            if session is None:
                break
            if session.usable:
                return session
            session.close()
    # (started from a thread that lives as long as the process: see _session_starter)
    return _session_starter().submit(sandbox.spare_session, PRELOAD).result()


def _give_back(session: SandboxSession, sandbox: Sandbox, warm: bool) -> None:
    """The response is done with ``session``: with ``warm`` its program is unloaded and it waits
    for the next response; else it is closed."""
    if warm and session.reusable and not session.broken:
        session.unload()
        if session.usable:
            with _idle_lock:
                pool = _idle.setdefault(_key(sandbox), [])
                if len(pool) < _MAX_IDLE:
                    pool.append(session)
                    return
    session.close()


def _session_starter() -> ThreadPoolExecutor:
    """The thread that starts the sessions. It lives as long as the process: bwrap's
    ``--die-with-parent`` fires when the *thread* that started it ends, and a session outlives
    the response (and the ``parallel_tests`` worker thread) that asked for it."""
    global _starter
    with _idle_lock:
        if _starter is None:
            _starter = ThreadPoolExecutor(1, thread_name_prefix="sandbox-start")
        return _starter


_starter: ThreadPoolExecutor | None = None


def _after_fork_in_child() -> None:
    global _starter
    _idle.clear()
    _starter = None  # (its thread did not survive the fork)


def close_idle_sandboxes() -> None:
    """Stop this process's idle sandboxes (also done at exit)."""
    with _idle_lock:
        sessions = [s for pool in _idle.values() for s in pool]
        _idle.clear()
    for s in sessions:
        s.close()


atexit.register(close_idle_sandboxes)
os.register_at_fork(after_in_child=_after_fork_in_child)


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
    if limits.execution == "per_test":
        driver = build_driver(code, testtype, func_name, marker)

        def new_runner() -> tuple[_Runner, Callable[[], None]]:
            def one(test: Mapping[str, str], timeout_s: float, cap: int) -> SandboxResult:
                sandbox = Sandbox(replace(limits.sandbox, timeout_s=timeout_s, max_output_bytes=cap), limits.settings)
                return sandbox.run(driver, test["input"])
            return one, lambda: None
    else:
        setup, run = build_driver_parts(code, testtype, func_name, marker)

        def new_runner() -> tuple[_Runner, Callable[[], None]]:
            runner = _SessionRunner(setup, run, limits)
            return runner, runner.close

    return _run_all(tests, testtype, marker, limits, new_runner)


def _run_all(tests: Sequence[Mapping[str, str]], testtype: str, marker: str, limits: ExecutionLimits,
             new_runner: Callable[[], tuple[_Runner, Callable[[], None]]]) -> list[TestResult]:
    """The tests in order, from ``parallel_tests`` workers (each with a runner of its own) taking
    the next test; then the results a serial run would give: the tests after the first compile
    error (or, with ``stop_on_first_failure``, the first failure) are skipped, whether or not a
    worker had already run them."""
    n = len(tests)
    results: list[TestResult | None] = [None] * n
    t0 = time.monotonic()
    lock, next_index, stop = threading.Lock(), [0], threading.Event()

    def stops(r: TestResult) -> bool:
        return r.status == "compile_error" or (limits.stop_on_first_failure and r.status != "passed")

    def work() -> None:
        run, close = new_runner()
        try:
            while not stop.is_set():
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= n:
                    return
                test = tests[i]
                left = limits.total_timeout_s - (time.monotonic() - t0)
                if left <= _MIN_TEST_BUDGET_S:
                    results[i] = TestResult("skipped", error="total time budget exhausted")
                    continue
                timeout_s = min(limits.timeout_s, left)
                r = result_of_run(run(test, timeout_s, limits.output_cap(test["output"])), test, testtype, marker,
                                  timeout_s, limits.stdout_compare)
                if r.status == "timeout" and left < limits.timeout_s:
                    r = replace(r, error=f"total time budget of {limits.total_timeout_s:g} s exhausted")
                results[i] = r
                if stops(r):
                    stop.set()
        finally:
            close()

    workers = min(limits.parallel_tests, n)
    if workers <= 1:
        work()
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="test") as pool:
            for f in [pool.submit(work) for _ in range(workers)]:
                f.result()
    out: list[TestResult] = []
    for i, r in enumerate(results):
        if r is None:  # never started: a worker stopped, or the budget was gone
            r = TestResult("skipped", error="total time budget exhausted")
        out.append(r)
        if stops(r):
            why = "the program does not compile" if r.status == "compile_error" else "stopped at the first failure"
            out += [TestResult("skipped", error=why)] * (n - i - 1)
            break
    return out


def check_program(code: str, tests: Sequence[Mapping[str, str]], *, testtype: str = "stdin",
                  func_name: str | None = None, limits: ExecutionLimits = ExecutionLimits(),
                  fmt: FeedbackFormat = FeedbackFormat()) -> Verdict:
    """:func:`run_tests`, with the verdict and the feedback text."""
    t0 = time.monotonic()
    results = run_tests(code, tests, testtype=testtype, func_name=func_name, limits=limits)
    feedback = feedback_text(tests, results, testtype, fmt)
    return Verdict(tuple(results), feedback, time.monotonic() - t0)
