"""Dataset adapters, looked up by name: ``get_task("sciknoweval", domains=["chemistry"], data_dir=...)``.

``TASKS`` maps a task name to ``"module:attribute"`` (imported on first use, so a task's heavy
dependencies load only when it is asked for) or directly to a task class. Adding a task is one
entry. A task class has a ``config_class`` (a dataclass of its options, checked without loading
any data) and is built from one instance of it: ``get_task(name, **options)`` is
``cls(cls.config_class(**options))``.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from distil_ray.tasks.base import DataFormatError, Grade, Task, TaskExample

__all__ = [
    "TASKS",
    "DataFormatError",
    "Grade",
    "Task",
    "TaskExample",
    "get_task",
    "register_task",
    "task_class",
    "task_names",
]

TASKS: dict[str, str | type] = {
    "sciknoweval": "distil_ray.tasks.sciknoweval:SciKnowEvalTask",
    "math": "distil_ray.tasks.math:MathTask",
    "livecodebench": "distil_ray.tasks.livecodebench:LiveCodeBenchTask",
    "toy": "distil_ray.tasks.toy:ToyTask",
    "two_formats": "distil_ray.tasks.two_formats:TwoFormatsTask",
}


def register_task(name: str, factory: str | type) -> None:
    """Add (or replace) a task: a task class with a ``config_class``, or ``"module:attribute"``
    naming one (checked when first resolved)."""
    if not isinstance(factory, str):
        _check_task_class(name, factory)
    TASKS[name] = factory


def task_names() -> list[str]:
    return sorted(TASKS)


def _check_task_class(name: str, cls: Any) -> type:
    config_class = getattr(cls, "config_class", None)
    if not isinstance(cls, type) or not dataclasses.is_dataclass(config_class):
        raise TypeError(f"task {name!r}: {cls!r} is not a task class with a dataclass config_class")
    return cls


def task_class(name: str) -> type:
    """The class registered as ``name`` (imported if need be, never built)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(task_names())}")
    entry = TASKS[name]
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        if not attr:
            raise ValueError(f"task {name!r}: factory {entry!r} is not of the form 'module:attribute'")
        entry = getattr(importlib.import_module(module_name), attr)
    return _check_task_class(name, entry)


def get_task(name: str, **cfg: Any) -> Task:
    """Build the task registered as ``name`` from its options (the fields of its ``config_class``)."""
    cls = task_class(name)
    return cls(cls.config_class(**cfg))
