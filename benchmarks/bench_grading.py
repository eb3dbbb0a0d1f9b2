"""Code grading speed: the project's grader, with one sandbox per response (``per_response``) and
one per test (``per_test``), against a plain in-process reference loop on the same workloads.

    python benchmarks/bench_grading.py [--reps 5] [--workers 1 2] [--quick] [--lcb DIR]

The reference is the LiveCodeBench-style baseline with no isolation at all: the solution is
compiled and the prelude imported once per response in this process, then each test runs in a
child forked from it, with the input on standard input (a memfd) and standard output captured
through a pipe; a test past its time limit is killed from here. No sandbox, no separate uid, no
limits other than the time limit: it bounds what any grader doing the same work could cost.

Workloads: LiveCodeBench 1873_A with its 5 real tests (the shared data's first record), 1 and 50
small stdin tests answered right, 50 tests answered wrong on test 40, a runtime error on each of
1873_A's tests, and a time-out (one test). Every grader must reach the same statuses on each (it
is checked). Serial: each response timed alone, the graders taking turns; the median over
``--reps``. With 2 workers: batches of responses over a pool of 2 processes (forked, so each
holds its own sandbox state), s/response = batch time / batch size, graders taking turns.

Graders: the reference, ``per_response`` (the default), ``per_test``, and ``per_response`` with
``parallel_tests=2`` (for information: the reference runs its tests one after another). With
``--lcb DIR`` (a checkout of LiveCodeBench, https://github.com/LiveCodeBench/LiveCodeBench, whose
``lcb_runner`` package is imported from DIR; it needs numpy), LiveCodeBench's own harness too:
``check_correctness`` of ``lcb_runner/evaluation/compute_code_generation_metrics.py`` as its
evaluation calls it (one process per response, all tests in it, ``debug=False``); its verdict
(passed, or the kind of its first failure: it stops there) is checked against the others'.

Printed: s/response, tests/s, the ratio to the reference (and to LiveCodeBench's harness); then
a fit, per grader, of s/response = fixed + per-test x n (from the 1- and 50-test workloads), and
for ``per_response`` where a test's time goes (the fork server's phases, medians over the 50-test
workload).

The 2 cores of a shared machine make single timings noisy: compare the columns of one run, not
runs of different days.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import select
import signal
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distil_ray.feedback.code import PRELUDE, ExecutionLimits, check_program, compare_stdout  # noqa: E402
from distil_ray.feedback.code import harness  # noqa: E402
from distil_ray.feedback.sandbox import SandboxLimits  # noqa: E402
from distil_ray.tasks.livecodebench.data import record_tests  # noqa: E402

SAMPLES = REPO.parent / "shared" / "data" / "samples"

SHORT_SORT = """
t = int(input())
for _ in range(t):
    s = input().strip()
    wrong = sum(a != b for a, b in zip(s, "abc"))
    print("YES" if wrong != 3 else "NO")
"""
CRASH = "t = int(input())\nprint(t // 0)\n"
SUM = "a, b = map(int, input().split())\nprint(a + b)\n"
SUM_WRONG_ON_40 = "a, b = map(int, input().split())\nprint(a + b + (a == 39))\n"
LOOP = "while True:\n    pass\n"
TIMEOUT_S = 6.0
LOOP_TIMEOUT_S = 1.0


def small_tests(n: int) -> list[dict[str, str]]:
    return [{"input": f"{i} {2 * i}\n", "output": f"{3 * i}\n"} for i in range(n)]


def workloads() -> dict[str, tuple[str, list[dict[str, str]], float]]:
    with open(SAMPLES / "livecodebench_records.jsonl") as f:
        record = json.loads(f.readline())
    lcb = record_tests(record)
    return {
        "1873_A, 5 real tests, correct": (SHORT_SORT, lcb, TIMEOUT_S),
        "1 stdin test, correct": (SUM, small_tests(1), TIMEOUT_S),
        "50 stdin tests, correct": (SUM, small_tests(50), TIMEOUT_S),
        "50 tests, wrong on test 40": (SUM_WRONG_ON_40, small_tests(50), TIMEOUT_S),
        "1873_A, runtime error": (CRASH, lcb, TIMEOUT_S),
        "timeout (1 test, 1 s)": (LOOP, small_tests(1), LOOP_TIMEOUT_S),
    }


# -- the reference: no isolation ------------------------------------------------------------------

def _reference_child(code_obj, ns: dict, in_fd: int, out_w: int) -> None:
    try:
        os.dup2(in_fd, 0)
        os.dup2(out_w, 1)
        sys.stdin = open(0, encoding="utf-8", newline="\n", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        try:
            exec(code_obj, ns)
        except SystemExit:
            pass
        sys.stdout.flush()
        os._exit(0)
    except BaseException:
        os._exit(1)


def reference_grade(code: str, tests: list[dict[str, str]], timeout_s: float) -> list[str]:
    """Statuses of ``code`` on ``tests``: each test in a child forked from this process."""
    try:
        code_obj = compile(code, "solution.py", "exec")
    except SyntaxError:
        return ["compile_error"] + ["skipped"] * (len(tests) - 1)
    ns = {"__name__": "__main__"}
    exec(PRELUDE, ns)
    statuses = []
    for test in tests:
        in_fd = os.memfd_create("stdin")
        os.write(in_fd, test["input"].encode())
        os.lseek(in_fd, 0, os.SEEK_SET)
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            _reference_child(code_obj, ns, in_fd, out_w)
        os.close(in_fd)
        os.close(out_w)
        out, deadline, timed_out = bytearray(), time.monotonic() + timeout_s, False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            if select.select([out_r], [], [], left)[0]:
                chunk = os.read(out_r, 1 << 16)
                if not chunk:
                    break
                out += chunk
        os.close(out_r)
        _, status = os.waitpid(pid, 0)
        if timed_out:
            statuses.append("timeout")
        elif os.waitstatus_to_exitcode(status) != 0:
            statuses.append("runtime_error")
        else:
            statuses.append("passed" if compare_stdout(out.decode(errors="replace"), test["output"]) else "wrong_answer")
    return statuses


# -- LiveCodeBench's own harness (optional) ------------------------------------------------------

_LCB = None  # its check_correctness, once --lcb is given
_LCB_CODES = {True: "passed", -2: "wrong_answer", -3: "timeout", -4: "runtime_error"}


def load_lcb(path: str) -> None:
    global _LCB
    sys.path.insert(0, str(Path(path).resolve()))
    from lcb_runner.evaluation.compute_code_generation_metrics import check_correctness
    _LCB = check_correctness


def lcb_grade(code: str, tests: list[dict[str, str]], timeout_s: float) -> list[str]:
    sample = {"input_output": json.dumps({"inputs": [t["input"] for t in tests],
                                          "outputs": [t["output"] for t in tests]})}
    results, _ = _LCB(sample, code, timeout=max(1, round(timeout_s)), debug=False)
    return [_LCB_CODES.get(r, f"code {r}") for r in results]


def verdict(statuses: list[str]) -> str:
    """Passed, or the first failure's kind: what every harness says, whether or not it stops."""
    return next((s for s in statuses if s != "passed"), "passed")


# -- the graders ------------------------------------------------------------------------------------

GRADERS = ("reference", "per_response", "per_test", "per_response, 2 tests at once")


def grade(grader: str, name: str) -> list[str]:
    code, tests, timeout_s = WORKLOADS[name]
    if grader == "reference":
        return reference_grade(code, tests, timeout_s)
    if grader == "livecodebench":
        return lcb_grade(code, tests, timeout_s)
    execution, _, parallel = grader.partition(", ")
    limits = ExecutionLimits(timeout_s=timeout_s, sandbox=SandboxLimits(memory_mb=2048), execution=execution,
                             parallel_tests=2 if parallel else 1)
    v = check_program(code, tests, limits=limits)
    return v.statuses


def timed_grade(grader: str, name: str) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    statuses = grade(grader, name)
    return time.perf_counter() - t0, statuses


def session_phases(name: str, reps: int = 5) -> dict[str, float]:
    """Medians of the fork server's phases of each test (plus the host's round trip), in s."""
    code, tests, timeout_s = WORKLOADS[name]
    samples: dict[str, list[float]] = {}
    grab = lambda res, *a, **k: samples.setdefault("_", []).append(res.phases) or _result_of_run(res, *a, **k)
    harness.result_of_run = grab
    try:
        for _ in range(reps):
            check_program(code, tests, limits=ExecutionLimits(timeout_s=timeout_s, execution="per_response"))
    finally:
        harness.result_of_run = _result_of_run
    phases = [p for p in samples.get("_", []) if p]
    keys = dict.fromkeys(k for p in phases for k in p)
    return {k: statistics.median(p[k] for p in phases if k in p) for k in keys}


WORKLOADS = workloads()
_result_of_run = harness.result_of_run


PHASES = {  # the fork server's phases of one test (forkserver.py), and the host's share
    "fork": "fork the test's process and set it up, before its test (while the previous one runs)",
    "dispatch": "request read, input and limits handed to the process",
    "run": "the process wakes, takes its uid, runs the program and exits",
    "collect": "output drained, leftovers checked, report written",
    "round_trip": "host: request sent to report parsed",
    "load": "once per response: setup (prelude, compile), confinement",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="timed responses per grader and workload (serial)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=6, help="responses per batch with several workers")
    ap.add_argument("--quick", action="store_true", help="3 reps, batches of 4")
    ap.add_argument("--lcb", metavar="DIR", help="a LiveCodeBench checkout: time its harness too")
    ap.add_argument("--only", nargs="+", metavar="TEXT", help="only the workloads whose names contain one of these")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.batch = 3, 4
    graders = GRADERS
    if args.lcb:
        load_lcb(args.lcb)
        graders = ("livecodebench",) + GRADERS
    rows = []  # (workload, workers, grader, s/response, tests/s, x reference, x LCB)
    for name in WORKLOADS:
        if args.only and not any(t in name for t in args.only):
            continue
        n_tests = len(WORKLOADS[name][1])
        expected = grade("reference", name)

        def check(g: str, got: list[str]) -> None:
            same = verdict(got) == verdict(expected) if g == "livecodebench" else got == expected
            if not same:
                raise SystemExit(f"{name}: {g} gave {got}, the reference {expected}")

        for g in graders:  # warm-up (bwrap's self-check, cgroup probe) and the verdict check
            check(g, grade(g, name))
        for workers in args.workers:
            samples: dict[str, list[float]] = {g: [] for g in graders}
            if workers == 1:
                for _ in range(args.reps):
                    for g in graders:
                        dt, statuses = timed_grade(g, name)
                        check(g, statuses)
                        samples[g].append(dt)
            else:
                with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                    list(pool.map(grade, [g for g in graders for _ in range(workers)], [name] * len(graders) * workers))
                    for _ in range(max(1, args.reps // 2)):
                        for g in graders:
                            t0 = time.perf_counter()
                            out = list(pool.map(grade, [g] * args.batch, [name] * args.batch))
                            samples[g].append((time.perf_counter() - t0) / args.batch)
                            for got in out:
                                check(g, got)
            ref = statistics.median(samples["reference"])
            lcb = statistics.median(samples["livecodebench"]) if args.lcb else float("nan")
            for g in graders:
                med = statistics.median(samples[g])
                rows.append((name, workers, g, med, n_tests / med, med / ref, med / lcb))
            print(f"  done: {name}, {workers} worker(s)", file=sys.stderr, flush=True)

    print(f"\n{'workload':32} {'workers':>7} {'grader':>30} {'s/response':>11} {'tests/s':>9} {'x reference':>11}"
          + (f" {'x LCB':>7}" if args.lcb else ""))
    for name, workers, g, med, tps, ratio, lcb_ratio in rows:
        print(f"{name:32} {workers:>7} {g:>30} {med:>11.4f} {tps:>9.1f} {ratio:>11.2f}"
              + (f" {lcb_ratio:>7.2f}" if args.lcb else ""))

    print("\nper-test cost (serial; fit of the 1- and 50-test workloads: s/response = fixed + per test x n)")
    med = {(n, g): m for n, w, g, m, *_ in rows if w == 1}
    one, fifty = "1 stdin test, correct", "50 stdin tests, correct"
    for g in graders:
        if (one, g) in med and (fifty, g) in med:
            per_test = (med[(fifty, g)] - med[(one, g)]) / 49
            fixed = med[(one, g)] - per_test
            print(f"  {g:>30}: {1000 * fixed:7.1f} ms fixed + {1000 * per_test:6.2f} ms per test")
    if fifty not in WORKLOADS or (args.only and not any(t in fifty for t in args.only)):
        return
    print(f"\nper_response, where a test's time goes ({fifty}; medians; 'fork' is off the critical path)")
    for key, ms in session_phases(fifty, args.reps).items():
        print(f"  {key:>10}: {1000 * ms:6.3f} ms  {PHASES.get(key, '')}")


if __name__ == "__main__":
    main()
