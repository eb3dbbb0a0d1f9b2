"""Chunked log-prob gathering vs. the plain ``log_softmax`` over full logits: time and memory.

    python benchmarks/bench_logprobs.py [--n 2048] [--vocab 151936] [--repeats 3]

Each variant runs forward + backward in its own fresh subprocess, so the peak-memory numbers do
not see each other's freed-but-cached pages. Peak extra memory is the peak resident set size
during one forward + backward minus the resident set size just before it (inputs already
allocated), sampled by a background thread every millisecond.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time


class PeakRSS:
    """Polls this process's RSS in a background thread; ``extra`` is the peak above the start."""

    def __init__(self, interval_s: float = 0.001):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.baseline = self.peak = 0

    def __enter__(self):
        self.baseline = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.baseline


def run_variant(variant: str, args) -> dict:
    import torch

    from distil_ray.learner.logprobs import gather_logprobs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, h, v, k, temperature = args.n, args.hidden, args.vocab, args.k, args.temperature
    hidden = (torch.randn(n, h) / h**0.5).requires_grad_()
    weight = torch.randn(v, h).requires_grad_()
    token_ids = torch.randint(0, v, (n,))
    topk_ids = torch.randint(0, v, (n, k))
    # Fixed upstream weights on both outputs, as a loss would put there.
    a = torch.rand(n)
    b = torch.rand(n, k)

    def step():
        if variant == "naive":
            logp = torch.log_softmax(hidden @ weight.T / temperature, dim=-1)
            tok = logp.gather(1, token_ids[:, None]).squeeze(1)
            topk = logp.gather(1, topk_ids)
        else:
            tok, topk = gather_logprobs(hidden, weight, token_ids, topk_ids,
                                        temperature=temperature, chunk_size=args.chunk)[:2]
        loss = (a * tok).sum() + (b * topk).sum()
        loss.backward()
        hidden.grad = weight.grad = None

    # Memory first, on a cold process: the first step is the one that has to find its memory.
    with PeakRSS() as mem:
        step()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "time_s": statistics.median(times),
            "peak_extra_mb": mem.extra / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=["naive", "chunked"],
                        help="run one variant in this process and print its result as JSON")
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return

    results = []
    for variant in ("naive", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{name}={getattr(args, name)}"
            for name in ("n", "hidden", "vocab", "k", "chunk", "temperature", "threads", "repeats")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
             os.environ.get("PYTHONPATH", "")]))
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))

    print(f"N={args.n} H={args.hidden} V={args.vocab} K={args.k} chunk={args.chunk} "
          f"float32, {args.threads} threads, forward+backward, median of {args.repeats}")
    naive = results[0]
    print(f"{'variant':<10}{'time (s)':>10}{'peak extra (MB)':>18}{'time ratio':>12}"
          f"{'mem ratio':>11}")
    for r in results:
        print(f"{r['variant']:<10}{r['time_s']:>10.3f}{r['peak_extra_mb']:>18.0f}"
              f"{r['time_s'] / naive['time_s']:>12.2f}"
              f"{r['peak_extra_mb'] / naive['peak_extra_mb']:>11.3f}")


if __name__ == "__main__":
    main()
