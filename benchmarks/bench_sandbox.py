"""Sandbox throughput and per-run overhead: bubblewrap vs. rlimits-only.

    python benchmarks/bench_sandbox.py [--runs 40] [--workers 2] [--latency-runs 30]

Throughput: ``--runs`` executions of a small program that reads its standard input (a list of
integers) and prints their sum, run one after another and then from a thread pool of
``--workers`` threads (the real system spreads executions over Ray actors; threads are enough to
show whether the sandbox itself serialises anything). Overhead: median wall time of an empty
program through each isolation mode, minus the median of starting the same interpreter
(``python -I -S -c pass``) with a bare ``subprocess.run``.

Layers: the same empty-run latency with the per-run cgroup turned off (``use_cgroup=False``), and
also without the seccomp filter and the fresh session keyring (patched out here; there is no
option for that), so the cost of each layer shows as a difference. (The supervisor loads
``ctypes`` in every variant, about 2.5 ms of interpreter start-up that the seccomp column does
not include.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from distil_ray.feedback.sandbox import bwrap_status, run_python
from distil_ray.feedback.sandbox import runner as sandbox_runner

PROGRAM = "import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))\n"


def one_run(isolation: str, i: int) -> float:
    numbers = list(range(i, i + 1000))
    res = run_python(PROGRAM, " ".join(map(str, numbers)), timeout_s=10, isolation=isolation)
    if res.status != "ok" or int(res.stdout) != sum(numbers):
        raise RuntimeError(f"unexpected result: {res}")
    return res.wall_s


def throughput(isolation: str, runs: int, workers: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for i in range(runs):
        one_run(isolation, i)
    serial = runs / (time.perf_counter() - t0)
    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda i: one_run(isolation, i), range(runs)))
        parallel = runs / (time.perf_counter() - t0)
    return serial, parallel


def median_latency(fn, n: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


@contextlib.contextmanager
def without_seccomp():
    """Runs as on an architecture without a filter (no seccomp, no fresh keyring), without
    logging the warning that comes with it."""
    saved = sandbox_runner._seccomp_for_host, sandbox_runner._log_once
    sandbox_runner._seccomp_for_host, sandbox_runner._log_once = (lambda: (None, None)), (lambda msg: msg)
    try:
        yield
    finally:
        sandbox_runner._seccomp_for_host, sandbox_runner._log_once = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--latency-runs", type=int, default=30)
    args = ap.parse_args()

    ok, why = bwrap_status()
    modes = (["bwrap"] if ok else []) + ["rlimits"]
    if not ok:
        print(f"(bubblewrap unavailable, measuring rlimits-only only: {why})")
    sandbox_runner._fallback_warned = True  # the fallback is asked for on purpose here: no log noise
    print(f"host: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, runs={args.runs}, workers={args.workers}")

    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    base = median_latency(lambda: subprocess.run([exe, "-I", "-S", "-c", "pass"], check=True), args.latency_runs)

    probe = run_python("pass")
    print(f"per-run cgroup: {probe.cgroup or 'none'}"
          + (f" ({probe.warning})" if probe.cgroup is None and probe.warning else ""))

    rows, layers = [], []
    for mode in modes:
        label = "bwrap" if mode == "bwrap" else "rlimits-only"
        one_run(mode, 0)  # warm-up (and the one-time bwrap self-check)
        serial, parallel = throughput(mode, args.runs, args.workers)
        lat = median_latency(lambda mode=mode: run_python("pass", isolation=mode), args.latency_runs)
        rows.append((label, serial, parallel, parallel / serial, lat * 1e3, (lat - base) * 1e3))
        no_cgroup = partial(run_python, "pass", isolation=mode, use_cgroup=False)
        no_cg = median_latency(no_cgroup, args.latency_runs)
        with without_seccomp():
            bare = median_latency(no_cgroup, args.latency_runs)
        layers.append((label, lat * 1e3, no_cg * 1e3, bare * 1e3))

    print()
    print(f"{'isolation':<14}{'serial exec/s':>15}{f'{args.workers} threads exec/s':>20}{'speed-up':>10}"
          f"{'empty run ms':>14}{'overhead ms':>13}")
    print(f"{'bare python':<14}{'':>15}{'':>20}{'':>10}{base * 1e3:>14.1f}{0.0:>13.1f}")
    for label, serial, parallel, speedup, lat_ms, over_ms in rows:
        print(f"{label:<14}{serial:>15.1f}{parallel:>20.1f}{speedup:>9.2f}x{lat_ms:>14.1f}{over_ms:>13.1f}")
    print()
    print(f"{'isolation':<14}{'all layers ms':>15}{'no cgroup ms':>14}{'no cgroup, no seccomp ms':>26}"
          f"{'cgroup ms':>11}{'seccomp+keyring ms':>20}")
    for label, full, no_cg, bare in layers:
        print(f"{label:<14}{full:>15.1f}{no_cg:>14.1f}{bare:>26.1f}{full - no_cg:>11.1f}{no_cg - bare:>20.1f}")
    print("\noverhead = median wall time of an empty program in the sandbox minus a bare "
          "`python -I -S -c pass`; both include interpreter start-up (the sandbox starts two: "
          "its supervisor and the program).")


if __name__ == "__main__":
    main()
