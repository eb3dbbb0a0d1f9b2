"""Rollout tokens/s through the RolloutWorker actor (Ray streaming generator, a header and a
record per sample, as the trainer reads them) vs the same vLLM engine driven directly in one
process, on the same prompts and sampling.

    python benchmarks/bench_rollout_overhead.py [--size tiny|100M] [--prompts 64] [--samples 4] [--tokens 64]

The two run one after the other (never competing for the cores), each with its own engine built the
same way and the same thread count; the first round of each is a warm-up. The actor's cost is per
sample (two streamed objects, a header and the record), so the tiny model, whose tokens cost almost
nothing, is the worst case; ``--size 100M`` shows a model whose tokens cost something.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "100M"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import numpy as np

    from distil_ray.config import RolloutConfig
    from distil_ray.engines import EngineOptions, SamplingConfig, build_engine
    from distil_ray.engines.base import configure_threads
    from distil_ray.models import TinyModelConfig, tiny_model_dir
    from distil_ray.records import Prompt
    from distil_ray.tasks.toy import ToyTask

    shape = {} if args.size == "tiny" else dict(hidden_size=768, num_layers=16, num_heads=12, num_kv_heads=4,
                                                head_dim=64, intermediate_size=2048)
    model_dir = str(tiny_model_dir(TinyModelConfig(**shape)))
    rng = np.random.default_rng(0)
    prompt_ids = [rng.integers(3, 400, int(n)).tolist() for n in rng.integers(16, 48, args.prompts)]
    sampling = SamplingConfig(n=args.samples, temperature=1.0, max_new_tokens=args.tokens, seed=0)
    # the actor gets as many threads as the driver process has (configure_threads: its CPU share)
    import torch

    cfg = RolloutConfig(num_cpus=float(torch.get_num_threads()), kv_cache_memory_bytes=128 << 20, max_num_seqs=256,
                        max_model_len=256)

    # 1) the engine in this process
    configure_threads()
    engine = build_engine("vllm", model_dir, EngineOptions(kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
                                                            max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len))
    direct = []
    for r in range(args.repeats + 1):
        t0 = time.perf_counter()
        tokens = sum(len(s.token_ids) for _, _, s in engine.generate(prompt_ids, sampling))
        if r:
            direct.append(tokens / (time.perf_counter() - t0))
    del engine

    # 2) the same through the actor, read as the trainer reads it
    import ray

    from distil_ray.rollout.worker import RolloutWorker

    ray.init(num_cpus=int(cfg.num_cpus), include_dashboard=False, log_to_driver=False)
    try:
        worker = ray.remote(num_cpus=cfg.num_cpus)(RolloutWorker).remote(model_dir, cfg)
        examples = ToyTask().load("train")
        prompts = [Prompt(example=examples[i], prompt_ids=np.asarray(p, np.int32)) for i, p in enumerate(prompt_ids)]
        prompts = [p.without_reference() for p in prompts]
        via_actor = []
        for r in range(args.repeats + 1):
            t0 = time.perf_counter()
            stream = worker.stream.options(num_returns="streaming").remote(prompts, sampling, 0)
            tokens = 0
            for header_ref in stream:
                uid, num_tokens = ray.get(header_ref)
                next(stream)  # the record's ref: routed on, never fetched here
                tokens += num_tokens
            tokens -= sum(len(p) for p in prompt_ids) * args.samples  # the header counts prompt + response
            if r:
                via_actor.append(tokens / (time.perf_counter() - t0))
    finally:
        ray.shutdown()
    print("rounds (tokens/s):", [round(x) for x in direct], [round(x) for x in via_actor])
    d, a = statistics.median(direct), statistics.median(via_actor)
    samples = args.prompts * args.samples
    per_sample_ms = (1 / a - 1 / d) * tokens / samples * 1e3
    print(f"{args.prompts} prompts x {args.samples} samples, up to {args.tokens} new tokens each, {args.size} model, vLLM CPU")
    print(f"{'path':<34}{'tokens/s':>10}")
    print(f"{'engine in this process':<34}{d:>10.0f}")
    print(f"{'RolloutWorker actor (streaming)':<34}{a:>10.0f}")
    print(f"overhead of the actor: {1 - a / d:+.1%} ({per_sample_ms:.2f} ms per sample)")


if __name__ == "__main__":
    main()
