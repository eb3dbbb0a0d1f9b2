"""Weight sync per step vs model size: the object store in float32 (the old path) and in bfloat16,
and vLLM's weight-transfer protocol over gloo (``weight_sync.backend=collective``) with 256 MB and
with 32 MB buckets (the default), on the CPU.

    python benchmarks/bench_weight_sync.py [--sizes tiny,100M,500M] [--repeats 3]

Each size is a random-init Qwen3-shaped model (the tiny tokenizer), two FSDP2 learner ranks (gloo)
and real vLLM CPU engines in Ray actors: one in float32 for the float32 object-store row, one in
bfloat16 for the other two. A sync is what ``WeightSync.push`` does in a run: from the learner
ranks' shards to the engine's loaded weights. Peak memory is the rise of the processes' peak
resident sets during one sync (Linux ``VmHWM``, reset first), learner ranks and engine together;
the object store's own copy (plasma shared memory) shows in whichever process maps it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

SIZES = {  # TinyModelConfig fields (vocab 512): parameter count ~ layers x per-layer
    "tiny": dict(),
    "100M": dict(hidden_size=768, num_layers=16, num_heads=12, num_kv_heads=4, head_dim=64, intermediate_size=2048),
    "500M": dict(hidden_size=1536, num_layers=20, num_heads=12, num_kv_heads=4, head_dim=128, intermediate_size=4096),
}


def _status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    return float("nan")


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def measure(sync, pids: list[int], version: int, repeats: int) -> tuple[float, float]:
    times, peaks = [], []
    for r in range(repeats):
        for pid in pids:
            _reset_peak(pid)
        before = sum(_status(pid, "VmRSS") for pid in pids)
        t0 = time.perf_counter()
        sync.push(version + r)
        times.append(time.perf_counter() - t0)
        peaks.append(sum(_status(pid, "VmHWM") for pid in pids) - before)
    return statistics.median(times), max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,100M,500M")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from distil_ray.config import AlgorithmConfig, LearnerConfig, RolloutConfig, WeightSyncConfig
    from distil_ray.engines.gloo_transfer import BACKEND
    from distil_ray.learner.group import LearnerGroup
    from distil_ray.learner.weight_sync import WeightSync
    from distil_ray.models import TinyModelConfig, build_tiny_model
    from distil_ray.rollout.worker import RolloutWorker

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for size in args.sizes.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                model_dir = build_tiny_model(TinyModelConfig(**SIZES[size]), Path(tmp) / "model")
                learner = LearnerGroup(str(model_dir), LearnerConfig(world_size=2, num_cpus=0.5), AlgorithmConfig("distil"))
                from safetensors import safe_open

                with safe_open(str(next(model_dir.glob("*.safetensors"))), "pt") as f:
                    n_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
                rollout = RolloutConfig(num_cpus=0.5, kv_cache_memory_bytes=64 << 20, max_model_len=256)
                actor = ray.remote(num_cpus=0.5)(RolloutWorker)
                engine32 = actor.remote(str(model_dir), rollout, dtype="float32")
                engine16 = actor.remote(str(model_dir), rollout, dtype="bfloat16", weight_transfer=BACKEND)
                ray.get([engine32.version.remote(), engine16.version.remote()])
                pids = ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in learner.actors])
                pid32 = ray.get(engine32.__ray_call__.remote(lambda self: os.getpid()))
                pid16 = ray.get(engine16.__ray_call__.remote(lambda self: os.getpid()))
                cases = [
                    ("object store, float32", WeightSync(learner, [engine32], dtype="float32"), pids + [pid32]),
                    ("object store, bfloat16", WeightSync(learner, [engine16], dtype="bfloat16"), pids + [pid16]),
                    ("collective (gloo), bf16, 256 MB",
                     WeightSync(learner, [engine16], None, WeightSyncConfig(backend="collective", bucket_mb=256),
                                dtype="bfloat16"),
                     pids + [pid16]),
                    ("  the same, 32 MB buckets",
                     WeightSync(learner, [engine16], None, WeightSyncConfig(backend="collective", bucket_mb=32),
                                dtype="bfloat16"),
                     pids + [pid16]),
                ]
                for name, sync, case_pids in cases:
                    sync.connect()
                    sync.push(1)  # warm-up: first-time allocations and group set-up
                    seconds, peak = measure(sync, case_pids, 2, args.repeats)
                    sync.close()
                    rows.append((size, n_params, name, seconds, peak))
                    print(f"{size:>5} {n_params / 1e6:7.1f}M  {name:<28} {seconds:7.3f} s  peak +{peak:7.0f} MiB", flush=True)
                learner.shutdown()
                for a in (engine32, engine16):
                    ray.kill(a)
    finally:
        ray.shutdown()
    print()
    print(f"{'model':>6} {'params':>8}  {'transport':<28} {'sync s':>8} {'peak MiB':>9} {'vs fp32 object store':>21}")
    base = {}
    for size, n, name, seconds, peak in rows:
        base.setdefault(size, seconds)
        print(f"{size:>6} {n / 1e6:7.1f}M  {name:<28} {seconds:8.3f} {peak:9.0f} {base[size] / seconds:20.2f}x")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


if __name__ == "__main__":
    main()
