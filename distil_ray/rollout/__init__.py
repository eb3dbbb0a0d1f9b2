"""Rollout: generation engines (vLLM, HF) behind one interface, and the RolloutWorker actor.

vLLM is imported only when a vLLM engine is built, so this package imports without it.
"""

from distil_ray.rollout.engine import ENGINES, GenerationEngine, Sample, SamplingConfig
from distil_ray.rollout.worker import RolloutWorker, build_engine

__all__ = ["ENGINES", "GenerationEngine", "RolloutWorker", "Sample", "SamplingConfig", "build_engine"]
