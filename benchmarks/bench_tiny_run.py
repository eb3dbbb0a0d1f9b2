"""The tiny experiment end to end, as a user runs it, for each algorithm given (default: distil
and grpo), each in a fresh process: wall time, where it went, and the validation curve.

    .venv/bin/python benchmarks/bench_tiny_run.py [--algorithms distil grpo] [--fresh]

--fresh builds the tiny model and its warm start from scratch in a temporary cache (what a new
machine sees); otherwise the cache in ~/.cache/distil_ray is used when present.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distil_ray.telemetry.report import report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", default=["distil", "grpo"])
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="bench_tiny_"))
    env = dict(os.environ)
    if args.fresh:
        env["DISTIL_RAY_CACHE"] = str(out / "cache")
    rows = []
    for algorithm in args.algorithms:
        run_dir = out / algorithm
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "distil_ray.main", "+experiment=tiny", f"algorithm={algorithm}",
             f"hydra.run.dir={run_dir}", *args.overrides],
            env=env, capture_output=True, text=True,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"{algorithm} failed:\n{proc.stderr[-3000:]}")
        rows.append((algorithm, wall))
        print(f"\n{algorithm}: process wall {wall:.1f} s (Python start to exit)")
        print(report(run_dir))
    print("\nalgorithm   process wall (s)")
    for algorithm, wall in rows:
        print(f"{algorithm:<10} {wall:>16.1f}")


if __name__ == "__main__":
    main()
