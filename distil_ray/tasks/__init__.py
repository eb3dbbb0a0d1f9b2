"""Dataset adapters, looked up by name: ``get_task("sciknoweval", domains=["chemistry"], data_dir=...)``.

``TASKS`` maps a task name to ``"module:attribute"`` (imported on first use, so a task's heavy
dependencies load only when it is asked for) or directly to a factory. Adding a task is one entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from distil_ray.tasks.base import DataFormatError, Grade, Task, TaskExample

__all__ = ["TASKS", "DataFormatError", "Grade", "Task", "TaskExample", "get_task", "register_task", "task_names"]

TASKS: dict[str, str | Callable[..., Task]] = {
    "sciknoweval": "distil_ray.tasks.sciknoweval:SciKnowEvalTask",
    "math": "distil_ray.tasks.math:MathTask",
    "livecodebench": "distil_ray.tasks.livecodebench:LiveCodeBenchTask",
    "toy": "distil_ray.tasks.toy:ToyTask",
}


def register_task(name: str, factory: str | Callable[..., Task]) -> None:
    """Add (or replace) a task: ``factory`` is a callable or a ``"module:attribute"`` string."""
    TASKS[name] = factory


def task_names() -> list[str]:
    return sorted(TASKS)


def _resolve(name: str, factory: str | Callable[..., Task]) -> Callable[..., Task]:
    if callable(factory):
        return factory
    module_name, _, attr = factory.partition(":")
    if not attr:
        raise ValueError(f"task {name!r}: factory {factory!r} is not of the form 'module:attribute'")
    return getattr(importlib.import_module(module_name), attr)


def get_task(name: str, **cfg: Any) -> Task:
    """Build the task registered as ``name`` with keyword configuration ``cfg``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(task_names())}")
    return _resolve(name, TASKS[name])(**cfg)
