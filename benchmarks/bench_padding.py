"""Padding in the learner's micro-batches: whole groups left-padded to their longest member (the
default) vs a token budget that takes records longest first (``learner.max_tokens_per_micro_batch``).

    python benchmarks/bench_padding.py [--groups 32] [--group-size 8] [--max-response 8192] [--budget 16384]

Response lengths are drawn uniformly from 1 to ``--max-response`` tokens after a 512-token prompt,
as a paper step's 32 prompts × 8 samples; only the layout is computed (no model), so the figures
are the share of computed positions that hold no token.
"""

from __future__ import annotations

import argparse

import numpy as np

from distil_ray.learner.packing import micro_batches, sequence_length, split_groups, token_budget_micro_batches
from distil_ray.records import Scored


def padding(parts) -> tuple[float, int, int]:
    computed = sum(len(p) * max(map(sequence_length, p)) for p in parts)
    real = sum(sequence_length(r) for p in parts for r in p)
    return 1 - real / computed, len(parts), max(len(p) * max(map(sequence_length, p)) for p in parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--max-response", type=int, default=8192)
    parser.add_argument("--budget", type=int, default=16384)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    records = [
        Scored(prompt_uid=f"g{g}", sample_index=i, response_ids=np.ones(int(rng.integers(1, args.max_response + 1)), np.int32),
               behaviour_logprobs=np.zeros(1, np.float32), finish_reason="stop", policy_version=0, text="",
               prompt_ids=np.ones(args.prompt, np.int32))
        for g in range(args.groups) for i in range(args.group_size)
    ]
    shards = split_groups(records, args.ranks)
    print(f"{args.groups} groups x {args.group_size} responses of 1..{args.max_response} tokens after a "
          f"{args.prompt}-token prompt, {args.ranks} ranks")
    print(f"{'micro-batches':<44}{'padding':>9}{'count':>8}{'largest (positions)':>21}")
    layouts = {
        "whole groups (micro_batch_size=8)": [micro_batches(s, args.group_size, split_large_groups=False) for s in shards],
        "whole groups (micro_batch_size=1, split)": [micro_batches(s, 1) for s in shards],
        f"token budget {args.budget}, longest first": [token_budget_micro_batches(s, args.budget, 64) for s in shards],
    }
    for name, per_rank in layouts.items():
        frac, count, largest = padding([p for rank in per_rank for p in rank])
        print(f"{name:<44}{frac:>9.3f}{count:>8}{largest:>21}")


if __name__ == "__main__":
    main()
