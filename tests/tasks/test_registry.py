"""The task registry: names resolve to classes without building them, ``get_task`` builds a task
from its typed section, and the sections check their values without loading any data."""

from __future__ import annotations

import dataclasses

import pytest

from distil_ray.tasks import TASKS, get_task, register_task, task_class, task_names
from distil_ray.tasks.base import Grade, TaskExample
from distil_ray.tasks.livecodebench import LiveCodeBenchConfig, LiveCodeBenchTask
from distil_ray.tasks.math import MathConfig, MathTask
from distil_ray.tasks.sciknoweval import SciKnowEvalConfig, SciKnowEvalTask
from distil_ray.tasks.toy import ToyConfig, ToyTask


@dataclasses.dataclass(frozen=True)
class EchoConfig:
    word: str = "hi"


class EchoTask:
    name = "echo"
    config_class = EchoConfig

    def __init__(self, cfg: EchoConfig | None = None):
        self.cfg = cfg or EchoConfig()

    def load(self, split: str) -> list[TaskExample]:
        return [TaskExample(f"echo/{split}/0", "echo", [{"role": "user", "content": self.cfg.word}], {})]

    def grade(self, example: TaskExample, response: str) -> Grade:
        ok = response == self.cfg.word
        return Grade(float(ok), ok, float(ok), "")


@pytest.mark.parametrize("name, cls, section", [
    ("livecodebench", LiveCodeBenchTask, LiveCodeBenchConfig),
    ("math", MathTask, MathConfig),
    ("sciknoweval", SciKnowEvalTask, SciKnowEvalConfig),
    ("toy", ToyTask, ToyConfig),
])
def test_every_task_resolves_to_a_class_with_a_section(name, cls, section):
    assert task_class(name) is cls and cls.config_class is section
    # the section's fields are the task's options, all with defaults: building it loads nothing
    assert dataclasses.is_dataclass(section) and section() == section()
    assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(section))


def test_get_task_builds_from_the_section():
    task = get_task("toy", seed=3, feedback_style="wrong")
    assert isinstance(task, ToyTask) and task.cfg == ToyConfig(seed=3, feedback_style="wrong")
    with pytest.raises(TypeError):
        get_task("toy", bogus=1)
    with pytest.raises(TypeError, match="^task 'toy' takes a ToyConfig \\(or None\\), not dict"):
        ToyTask({"seed": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^unknown task 'nope'; valid tasks: livecodebench, math, sciknoweval, toy"):
        task_class("nope")


def test_register_task():
    register_task("echo", EchoTask)
    try:
        assert "echo" in task_names() and task_class("echo") is EchoTask
        task = get_task("echo", word="ho")
        assert task.grade(task.load("test")[0], "ho").correct
        with pytest.raises(TypeError, match="not a task class with a dataclass config_class"):
            register_task("broken", lambda **kw: EchoTask())
        register_task("lazy", "distil_ray.tasks.toy:grade_code")  # checked when resolved
        with pytest.raises(TypeError, match="not a task class"):
            task_class("lazy")
    finally:
        TASKS.pop("echo", None)
        TASKS.pop("lazy", None)


@pytest.mark.parametrize("section, kwargs, message", [
    (LiveCodeBenchConfig, {"test_cases": "x"}, "test_cases='x': allowed values are 'all', 'public', 'private'"),
    (LiveCodeBenchConfig, {"train_fraction": 2.0}, "train_fraction=2.0: must lie in (0, 1]"),
    (LiveCodeBenchConfig, {"start_date": "soon"}, "start_date='soon': not an ISO date"),
    (LiveCodeBenchConfig, {"timeout_s": 0}, "timeout_s=0: must be > 0"),
    (LiveCodeBenchConfig, {"sandbox_kwargs": {"timeout_s": 1}}, "sandbox_kwargs: timeout_s is set by the field"),
    (LiveCodeBenchConfig, {"sandbox_kwargs": {"isolaton": "bwrap"}},
     "sandbox_kwargs={'isolaton': 'bwrap'}: unknown sandbox option(s) isolaton"),
    (LiveCodeBenchConfig, {"sandbox_kwargs": {"isolation": "docker"}},
     "sandbox_kwargs={'isolation': 'docker'}: isolation must be one of"),
    (MathConfig, {"isolation": "fork"}, "isolation='fork': allowed values are 'process', 'thread'"),
    (MathConfig, {"train": ["nowhere"]}, "train=['nowhere']: unknown math source 'nowhere' in train"),
    (MathConfig, {"hub": {"x": 5}}, "hub={'x': 5}: each entry is"),
    (SciKnowEvalConfig, {"domains": []}, "domains=[]: no domains given"),
    (SciKnowEvalConfig, {"test_size": 1.5}, "test_size=1.5: must be a fraction in (0, 1)"),
    (ToyConfig, {"num_symbols": 1}, "num_symbols=1: must lie in [2, 20]"),
])
def test_sections_name_the_bad_field_first(section, kwargs, message):
    with pytest.raises(ValueError) as err:
        section(**kwargs)
    assert str(err.value).startswith(message), str(err.value)


def test_livecodebench_limits_go_through_the_sandbox_records():
    cfg = LiveCodeBenchConfig(memory_mb=512, max_output_bytes=4096,
                              sandbox_kwargs={"isolation": "rlimits", "max_processes": 8, "max_output_bytes": 1024})
    limits = cfg.execution_limits()
    assert (limits.timeout_s, limits.total_timeout_s, limits.max_output_bytes) == (6.0, 60.0, 1024)
    assert (limits.sandbox.memory_mb, limits.sandbox.max_processes) == (512, 8)
    assert limits.settings.isolation == "rlimits"
    sandbox = limits.sandbox_for("expected", 2.5)
    assert (sandbox.limits.timeout_s, sandbox.limits.max_output_bytes, sandbox.limits.memory_mb) == (2.5, 1024, 512)
    # without a fixed cap: twice the expected output, at least 1 MiB, rounded up to a power of two
    default = LiveCodeBenchConfig().execution_limits()
    assert default.sandbox_for("x" * (1 << 20), 6.0).limits.max_output_bytes == 4 << 20
    assert default.sandbox_for("x" * 500_000, 6.0).limits.max_output_bytes == 2 << 20
    assert default.sandbox_for("x", 6.0).limits.max_output_bytes == 1 << 20
