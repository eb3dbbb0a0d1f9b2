"""Grading throughput: a serial in-process loop vs the FeedbackPool's Ray actors, on the same
LiveCodeBench gradings (the real sample problem 1873_A, 5 tests each, every test a sandboxed run).

    .venv/bin/python benchmarks/bench_feedback_pool.py [--gradings 24] [--workers 2]

Ray start-up and actor creation are excluded (each actor grades once before timing).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import ray

from distil_ray.config import FeedbackConfig, TaskConfig
from distil_ray.feedback.pool import FeedbackPool, Grader
from distil_ray.records import Rollout
from distil_ray.tasks.livecodebench import example_from_record

RECORDS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "samples" / "livecodebench_records.jsonl"
SOLUTION = """```python
t = int(input())
for _ in range(t):
    s = input().strip()
    print("YES" if sum(a != b for a, b in zip(s, "abc")) != 3 else "NO")
```"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gradings", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    example = example_from_record(json.loads(RECORDS.read_text().splitlines()[0]), "test")
    n_tests = len(example.reference["tests"])
    rollouts = [
        Rollout(example.uid, i, np.zeros(1, np.int32), np.zeros(1, np.float32), "stop", 0, SOLUTION, np.zeros(1, np.int32))
        for i in range(args.gradings)
    ]

    grader = Grader(TaskConfig("livecodebench"))
    grader.grade(example, rollouts[0])  # warm-up
    t0 = time.perf_counter()
    serial = [grader.grade(example, r) for r in rollouts]
    serial_s = time.perf_counter() - t0

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    pool = FeedbackPool(TaskConfig("livecodebench"), FeedbackConfig(num_workers=args.workers, num_cpus=1.0),
                        name="bench-feedback")
    example_ref = ray.put(example)
    pool.grade_all([(example_ref, r) for r in rollouts[: args.workers]])  # warm-up: every actor once
    t0 = time.perf_counter()
    pooled = pool.grade_all([(example_ref, r) for r in rollouts])
    pool_s = time.perf_counter() - t0
    pool.shutdown()
    ray.shutdown()

    assert all(g.correct for g in serial + pooled)
    executions = args.gradings * n_tests
    print(f"{args.gradings} gradings × {n_tests} sandboxed tests, {os.cpu_count()} CPUs")
    print(f"{'variant':<22}{'time (s)':>10}{'gradings/s':>12}{'executions/s':>14}{'speed-up':>10}")
    for name, secs in (("serial loop", serial_s), (f"FeedbackPool ×{args.workers}", pool_s)):
        print(f"{name:<22}{secs:>10.2f}{args.gradings / secs:>12.1f}{executions / secs:>14.1f}{serial_s / secs:>9.2f}x")


if __name__ == "__main__":
    main()
