"""Teacher scoring of a round: one engine call per prompt group (the old path) vs every queued
group in one call (``TeacherScorer.score_groups``, what the TeacherActor does), same vLLM engine,
same groups.

    python benchmarks/bench_teacher_batching.py [--groups 32] [--samples 8] [--response 256] [--k 20]

Each group is a prompt with ``--samples`` failed responses and feedback, so every response gets a
teacher context (prompt + its own feedback) and is scored.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from distil_ray.config import TeacherConfig
    from distil_ray.models import TinyModelConfig, tiny_model_dir
    from distil_ray.records import Graded, Prompt, Rollout
    from distil_ray.tasks.base import TaskExample
    from distil_ray.teacher.scorer import TeacherScorer

    model_dir = str(tiny_model_dir(TinyModelConfig(max_position_embeddings=4096)))
    scorer = TeacherScorer(model_dir, TeacherConfig(topk=args.k, kv_cache_memory_bytes=256 << 20, update="fixed"))
    tok = scorer.tokenizer
    rng = np.random.default_rng(0)
    groups = []
    for g in range(args.groups):
        messages = [{"role": "user", "content": f"Question {g}: what is {g} + {g}?"}]
        prompt = Prompt(TaskExample(f"q{g}", "toy", messages, {}),
                        np.asarray(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False), np.int32))
        graded = []
        for i in range(args.samples):
            ids = rng.integers(3, 400, args.response).astype(np.int32)
            rollout = Rollout(f"q{g}", i, ids, np.zeros(len(ids), np.float32), "stop", 0, "wrong", prompt.prompt_ids)
            graded.append(Graded.from_rollout(rollout, reward=0.0, correct=False, feedback=f"Wrong: it is {2 * g}."))
        groups.append((prompt, graded))
    positions = args.groups * args.samples * args.response

    def per_group():
        return [scorer.score_group(p, g) for p, g in groups]

    def batched():
        return scorer.score_groups(groups)

    batched()  # warm-up
    rows, results = {}, {}
    for name, fn in (("one call per group", per_group), ("all groups in one call", batched)):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            results[name] = fn()
            times.append(time.perf_counter() - t0)
        rows[name] = statistics.median(times)
    a, b = results.values()
    same = all(np.array_equal(x.teacher_topk_ids, y.teacher_topk_ids)
               and np.allclose(x.teacher_topk_logprobs, y.teacher_topk_logprobs, atol=1e-5)
               for ga, gb in zip(a, b) for x, y in zip(ga, gb))
    print(f"{args.groups} groups x {args.samples} responses x {args.response} tokens = {positions} positions, "
          f"top-{args.k}, tiny model, vLLM CPU; median of {args.repeats}")
    print(f"{'path':<26}{'seconds':>9}{'s per 1k positions':>20}{'speed-up':>10}")
    base = rows["one call per group"]
    for name, seconds in rows.items():
        print(f"{name:<26}{seconds:>9.2f}{seconds / positions * 1e3:>20.4f}{base / seconds:>9.2f}x")
    print(f"same scores both ways: {same}")


if __name__ == "__main__":
    main()
