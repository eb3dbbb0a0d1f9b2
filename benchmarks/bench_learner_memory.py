"""Learner memory per train step: activation checkpointing off vs on, measured on the CPU.

    python benchmarks/bench_learner_memory.py [--layers 8] [--hidden 1024] [--tokens 4096]

A random-init Qwen3-shaped model (no download), large enough that activations dominate, trains
with one ``LearnerWorker`` (world size 1, gloo, float32) on one SFT sequence of ``--tokens``
tokens. Each variant runs in a fresh process (peak memory is per process); inside it a first step
creates the optimizer state, then a second step is measured: its peak resident memory above the
resting state (model, gradients' buffers and Adam moments in place), sampled every 2 ms. Large
allocations are served by mmap (``MALLOC_MMAP_THRESHOLD_``), so freed activations leave the
resident set and the samples track live memory. The gradients of the step (one float32 copy of
the parameters) are part of "above rest" in both variants; "activations" subtracts them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build_model(out: Path, layers: int, hidden: int, vocab: int) -> int:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), head_dim=64,
                         max_position_embeddings=32768, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(model_dir: str, tokens: int, checkpointing: bool) -> dict:
    import socket

    import torch

    from distil_ray.config import AlgorithmConfig, LearnerConfig
    from distil_ray.learner.worker import LearnerWorker, Rendezvous
    from distil_ray.records import Scored

    torch.set_num_threads(os.cpu_count() or 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = LearnerConfig(world_size=1, lr=1e-5, micro_batch_size=1, activation_checkpointing=checkpointing)
    worker = LearnerWorker(model_dir, cfg, AlgorithmConfig("sft"), Rendezvous(0, 1, "127.0.0.1", port))
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, 1000, 256).astype(np.int32)
    response = rng.integers(2, 1000, tokens - 256).astype(np.int32)
    record = Scored(prompt_uid="p", sample_index=0, response_ids=response,
                    behaviour_logprobs=np.zeros(len(response), np.float32), finish_reason="stop",
                    policy_version=0, text="", prompt_ids=prompt, reward=1.0, correct=True)
    worker.train_step([record])  # the optimizer state now exists
    rest = rss_mb()
    peak = [rest]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    worker.train_step([record])
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    worker.close()
    return {"rest_mb": rest, "peak_mb": peak[0], "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.tokens, args.child[1] == "on")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_model(Path(tmp), args.layers, args.hidden, args.vocab)
        grads_mb = n_params * 4 / 2**20
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=str(ROOT))
        rows = {}
        for variant in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--child", tmp, variant],
                                 env=env, capture_output=True, text=True, check=True)
            rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"model: {args.layers} layers, hidden {args.hidden}, {n_params / 1e6:.0f}M parameters "
          f"(float32 gradients {grads_mb:.0f} MB); one sequence of {args.tokens} tokens; {os.cpu_count()} CPUs")
    print(f"{'checkpointing':<14}{'step s':>9}{'rest MB':>10}{'peak MB':>10}{'above rest MB':>15}{'activations MB':>16}{'ratio':>8}")
    base = None
    for variant, r in rows.items():
        above = r["peak_mb"] - r["rest_mb"]
        act = above - grads_mb
        base = act if base is None else base
        print(f"{variant:<14}{r['step_s']:>9.1f}{r['rest_mb']:>10.0f}{r['peak_mb']:>10.0f}{above:>15.0f}{act:>16.0f}"
              f"{act / base:>8.2f}")
    per_token_layer = base / args.tokens / args.layers * 1024
    print(f"activations without checkpointing: {per_token_layer:.1f} KiB per token per layer (float32)")


if __name__ == "__main__":
    main()
