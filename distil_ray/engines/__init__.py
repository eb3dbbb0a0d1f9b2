"""Inference engines, one per backend: ``hf`` (transformers) and ``vllm``. Each generates
(streaming), scores the teacher's top-k on given token ids and loads new weights in place; the
RolloutWorker and the TeacherScorer are thin actors over them.

vLLM is imported only when a vLLM engine is built, so this package imports without it.
"""

from __future__ import annotations

from distil_ray.config import ENGINE_BACKENDS
from distil_ray.engines.base import Engine, EngineOptions, Sample, SamplingConfig, TeacherScores


def build_engine(backend: str, model_path: str, options: EngineOptions | None = None) -> Engine:
    """The engine of ``backend`` ('vllm' or 'hf', as ``rollout.engine`` / ``teacher.backend`` say)."""
    if backend == "vllm":
        from distil_ray.engines.vllm import VLLMEngine

        return VLLMEngine(model_path, options)
    if backend == "hf":
        from distil_ray.engines.hf import HFEngine

        return HFEngine(model_path, options)
    raise ValueError(f"engine backend {backend!r}: allowed values are {', '.join(map(repr, ENGINE_BACKENDS))}")


__all__ = ["Engine", "EngineOptions", "Sample", "SamplingConfig", "TeacherScores", "build_engine"]
