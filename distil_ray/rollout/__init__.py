"""Rollout: the RolloutWorker actor over an engine of ``distil_ray.engines``."""

from distil_ray.rollout.worker import RolloutWorker

__all__ = ["RolloutWorker"]
