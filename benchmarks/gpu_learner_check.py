"""One learner step of the paper's shape on one GPU, without Ray or vLLM (torch + transformers only).

    python benchmarks/gpu_learner_check.py                 # Qwen3-8B shape, 12 of its 36 layers
    python benchmarks/gpu_learner_check.py --layers 36     # the whole depth (needs ~140 GB: see below)
    python benchmarks/gpu_learner_check.py --smoke         # a tiny shape, on the CPU if no GPU

A ``LearnerWorker`` (the plain class the Ray actor wraps) at world size 1 with the NCCL backend
(``cpu:gloo,cuda:nccl``), bfloat16 compute, float32 master weights, activation checkpointing and
one sequence per micro-batch, trains a Qwen3-8B-shaped model built from its config with random
weights (no download) on ``--seqs`` sequences of ``--prompt`` + ``--response`` tokens with the
DistIL loss (random teacher top-k), one sequence per micro-batch and then packed (several per
micro-batch, varlen flash attention). It prints peak memory, step time, tokens/s and MFU
(6 · matmul parameters · tokens / step time / peak bf16 FLOP/s), then runs the ``gpu``-marked tests if
pytest is installed. Master weights, gradients and Adam moments take 16 bytes per parameter:
8.2 B parameters need 131 GB before any activation, more than one H200 holds with a 10k-token
sequence in flight; the default depth keeps the step on one device, and the per-layer numbers
scale to the full model (and to the 2 FSDP ranks of the paper's layout, which halve the states).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distil_ray.config import AlgorithmConfig, LearnerConfig  # noqa: E402
from distil_ray.learner.worker import LearnerWorker, Rendezvous  # noqa: E402
from distil_ray.records import Scored  # noqa: E402

QWEN3_8B = dict(vocab_size=151_936, hidden_size=4096, intermediate_size=12_288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40_960,
                rope_theta=1_000_000.0, tie_word_embeddings=False)
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, max_position_embeddings=4096, tie_word_embeddings=False)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, per GPU


def build_model_dir(out: Path, shape: dict, layers: int | None) -> int:
    """Random weights from the config alone, saved in bfloat16 (half the disk, the learner keeps
    float32 master weights in memory either way)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**{**shape, **({"num_hidden_layers": layers} if layers else {})},
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def make_records(n: int, prompt: int, response: int, vocab: int, k: int) -> list[Scored]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        top_ids = rng.integers(2, vocab, (response, k)).astype(np.int32)
        top_lp = np.sort(np.log(rng.dirichlet(np.ones(k + 1), response)[:, :k]).astype(np.float32), -1)[:, ::-1]
        records.append(Scored(
            prompt_uid=f"p{i // 8}", sample_index=i % 8, response_ids=rng.integers(2, vocab, response).astype(np.int32),
            behaviour_logprobs=np.full(response, -1.0, np.float32), finish_reason="stop", policy_version=0, text="",
            prompt_ids=rng.integers(2, vocab, prompt).astype(np.int32), reward=float(i % 2), feedback="f",
            teacher_topk_ids=top_ids, teacher_topk_logprobs=np.ascontiguousarray(top_lp),
            teacher_token_logprobs=np.full(response, -1.0, np.float32), distill_mask=True))
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="decoder layers of the Qwen3-8B shape (36 = all)")
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--response", type=int, default=8192)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2, help="the last one is timed (the first builds Adam's state)")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape and short sequences (runs on the CPU)")
    parser.add_argument("--no-tests", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.smoke:
        shape, layers, args.prompt, args.response, args.seqs = SMOKE, None, 16, 48, 4
    else:
        shape, layers = QWEN3_8B, args.layers
        if not cuda:
            print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
            return 2
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        n_params = build_model_dir(Path(tmp), shape, layers)
        build_s = time.perf_counter() - t0
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # as the paper's experiments run: DistIL's group baseline, a token budget that splits the
        # group, one sequence per micro-batch; then packed: several sequences per micro-batch
        # concatenated, attention by their boundaries (torch's varlen flash kernel)
        variants = {
            "one per micro-batch": dict(micro_batch_size=1, max_tokens_per_micro_batch=16384),
            "packed": dict(micro_batch_size=args.seqs, packed_sequences=True,
                           max_tokens_per_micro_batch=3 * (args.prompt + args.response)),
        }
        records = make_records(args.seqs, args.prompt, args.response, shape["vocab_size"], args.topk)
        results = {}
        for name, learner in variants.items():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cfg = LearnerConfig(world_size=1, num_gpus=1 if cuda else 0, backend="nccl" if cuda else "gloo",
                                dtype="bfloat16", lr=1e-6, activation_checkpointing=True, **learner)
            t0 = time.perf_counter()
            worker = LearnerWorker(tmp, cfg, AlgorithmConfig("distil", {"baseline": "group"}),
                                   Rendezvous(0, 1, "127.0.0.1", port))
            load_s = time.perf_counter() - t0
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                for _ in range(args.steps):
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    metrics = worker.train_step(records)
                    if cuda:
                        torch.cuda.synchronize()
                    step_s = time.perf_counter() - t0
                # the learner's side of a weight sync: full weights gathered, in bfloat16 numpy
                t0 = time.perf_counter()
                sync_bytes = worker.weights("bfloat16").nbytes
                sync_s = time.perf_counter() - t0
            finally:
                worker.close()
                del worker
                if cuda:
                    torch.cuda.empty_cache()
            results[name] = (load_s, step_s, metrics, sync_bytes, sync_s)
    tokens = args.seqs * (args.prompt + args.response)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)
    # matmul parameters only (the input embedding is a lookup); the extra no-grad pass of the
    # group baseline is not counted, so this is the MFU of the useful work
    matmul_params = n_params - shape["vocab_size"] * shape["hidden_size"]
    print(f"device: {device_name}; torch {torch.__version__}; backend "
          f"{'nccl (cpu:gloo,cuda:nccl)' if cuda else 'gloo'}")
    print(f"model: Qwen3 shape, {shape['num_hidden_layers'] if layers is None else layers} layers, "
          f"{n_params / 1e9:.2f} B parameters; built in {build_s:.0f} s")
    print(f"batch: {args.seqs} sequences x ({args.prompt} prompt + {args.response} response) = {tokens} tokens, "
          f"DistIL with the group baseline, activation checkpointing on, bf16 compute")
    print(f"{'variant':<22}{'load s':>7}{'step s':>8}{'tokens/s':>11}{'peak GiB':>10}{'MFU':>7}{'loss':>9}"
          f"{'grad norm':>11}{'micro':>6}{'sync GiB':>9}{'sync s':>7}")
    finite = True
    for name, (load_s, step_s, metrics, sync_bytes, sync_s) in results.items():
        mfu = 6 * matmul_params * tokens / step_s / peak if peak else float("nan")
        print(f"{name:<22}{load_s:>7.0f}{step_s:>8.2f}{tokens / step_s:>11.0f}"
              f"{metrics['learner/peak_memory_mb'] / 1024:>10.1f}{mfu:>7.1%}{metrics['loss']:>9.4f}"
              f"{metrics['grad_norm']:>11.3g}{metrics['num_micro_batches']:>6.0f}{sync_bytes / 2**30:>9.1f}{sync_s:>7.1f}")
        finite = finite and np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    losses = [r[2]["loss"] for r in results.values()]
    print(f"packed vs one per micro-batch: loss difference {abs(losses[0] - losses[-1]):.2e} (bf16; same records)")
    if not finite:
        print("a step is not finite", file=sys.stderr)
        return 1
    if args.no_tests:
        return 0
    try:
        import pytest  # noqa: F401
    except ImportError:
        print("pytest is not installed: the gpu-marked tests were not run")
        return 0
    # the gpu-marked tests that need neither Ray nor the project's pytest options (pytest-timeout)
    tests = [str(ROOT / "tests" / "learner" / name) for name in ("test_logprobs_gpu.py", "test_attention.py",
                                                                  "test_collectives.py")]
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-o", "addopts=", "-p", "no:cacheprovider",
                            *tests], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


if __name__ == "__main__":
    sys.exit(main())
