"""Teacher scoring with vLLM's prompt log-probs: reading the top-k out of one dict of ``Logprob``
objects per position (the old way) vs vLLM's flat lists read with numpy (``flat_logprobs=True``,
what ``VLLMEngine.score_topk`` does), on the same requests in the same process.

    python benchmarks/bench_teacher_scoring.py [--requests 16] [--context 512] [--response 1536] [--k 20]

The tiny local model keeps the forward pass cheap, so what differs is the per-position Python
work that a paper step multiplies by ~2.5M teacher positions (256 responses of up to 8k tokens,
plus their contexts: vLLM returns a row for every prompt position).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def dict_readout(outputs, prompts, responses, k):
    out = []
    for p, r, o in zip(prompts, responses, outputs):
        rows = o.prompt_logprobs[len(p):len(p) + len(r)]
        best = [sorted(row.items(), key=lambda kv: (kv[1].rank, -kv[1].logprob))[:k] for row in rows]
        out.append((np.array([[t for t, _ in b] for b in best]), np.array([[lp.logprob for _, lp in b] for b in best]),
                    np.array([row[t].logprob for row, t in zip(rows, r)])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--response", type=int, default=1536)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from distil_ray.engines import EngineOptions
    from distil_ray.engines.vllm import VLLMEngine, _extract_topk
    from distil_ray.models import TinyModelConfig, tiny_model_dir

    model_dir = tiny_model_dir(TinyModelConfig(max_position_embeddings=4096))
    engine = VLLMEngine(str(model_dir), EngineOptions(kv_cache_memory_bytes=256 << 20, max_logprobs=max(args.k, 20)))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, args.context).tolist() for _ in range(args.requests)]
    responses = [rng.integers(3, 500, args.response).tolist() for _ in range(args.requests)]
    inputs = [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompts, responses)]
    positions = args.requests * args.response
    rows = {}
    for flat in (False, True):
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=args.k, detokenize=False,
                                flat_logprobs=flat)
        engine.llm.generate(inputs[:1], params, use_tqdm=False)  # warm-up
        gen_s, read_s = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outputs = engine.llm.generate(inputs, params, use_tqdm=False)
            t1 = time.perf_counter()
            if flat:
                scores = [_extract_topk(o.prompt_logprobs, len(p), r, args.k) for p, r, o in zip(prompts, responses, outputs)]
            else:
                scores = dict_readout(outputs, prompts, responses, args.k)
            t2 = time.perf_counter()
            gen_s.append(t1 - t0)
            read_s.append(t2 - t1)
        rows["flat (numpy)" if flat else "dicts (per position)"] = (statistics.median(gen_s), statistics.median(read_s))
        last = scores
    check = dict_readout(engine.llm.generate(inputs, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=args.k,
                                                                   detokenize=False), use_tqdm=False),
                         prompts, responses, args.k)
    same = all(np.array_equal(np.asarray(a.topk_ids), b[0]) and np.allclose(np.asarray(a.topk_logprobs), b[1], atol=1e-6)
               for a, b in zip(last, check))
    print(f"{args.requests} requests x ({args.context} context + {args.response} response) tokens, top-{args.k}; "
          f"{positions} response positions; median of {args.repeats}")
    print(f"{'read-out':<22}{'engine s':>10}{'read-out s':>12}{'us/position':>13}{'positions/s':>13}")
    for name, (g, r) in rows.items():
        print(f"{name:<22}{g:>10.2f}{r:>12.3f}{r / positions * 1e6:>13.1f}{positions / (g + r):>13.0f}")
    print(f"flat read-out equals the dict read-out: {same}")


if __name__ == "__main__":
    main()
