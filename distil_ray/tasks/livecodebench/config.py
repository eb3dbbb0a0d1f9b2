"""The LiveCodeBench task's configuration section (``task.kwargs`` of ``task=livecodebench``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

from distil_ray.feedback.code import ExecutionLimits, FeedbackFormat
from distil_ray.feedback.code.harness import EXECUTION_MODES
from distil_ray.feedback.sandbox import SandboxLimits, SandboxSettings, split_sandbox_options
from distil_ray.config import check_choice, check_positive
from distil_ray.tasks.livecodebench.data import HUB_NAME, TEST_CASE_SOURCES, as_date
from distil_ray.feedback.code.compare import STDOUT_COMPARES
from distil_ray.tasks.livecodebench.prompts import EXTRACTIONS, PROMPT_STYLES, SYSTEM_PROMPT

# Sandbox options that have a field of their own here (the per-test limit and the memory limit).
_OWN_FIELDS = ("timeout_s", "memory_mb")


@dataclass(frozen=True)
class LiveCodeBenchConfig:
    """The options of :class:`LiveCodeBenchTask`, checked here without loading any data."""

    # where the records come from: the hub name (loaded with ``datasets`` and the three options
    # below) or a local JSONL / Parquet file or directory of such files in the hub schema
    source: str | os.PathLike = HUB_NAME
    version_tag: str = "release_v6"
    revision: str | None = None
    trust_remote_code: bool = True
    # problems with start_date <= contest_date < end_date (None: open)
    start_date: str | datetime | None = "2025-02-01"
    end_date: str | datetime | None = "2025-05-01"
    test_cases: str = "all"  # all (public then private) | public | private
    train_fraction: float = 0.5  # share of each problem's tests the train split keeps
    seed: int = 0  # of that choice
    system_prompt: str | None = SYSTEM_PROMPT
    prompt_style: str = "lcb"  # lcb | sdpo: the question's layout (prompts.py)
    extraction: str = "last_python"  # last_python | longest: which code block is the program (prompts.py)
    stdout_compare: str = "decimal"  # decimal (the official harness) | exact (SDPO): stdin outputs (compare.py)
    # False: a response that passes every test gets empty feedback (SDPO), so unless a sibling's
    # solution is shown its teacher has no context and it is not distilled
    feedback_on_success: bool = True
    timeout_s: float = 6.0  # each test
    total_timeout_s: float = 60.0  # all tests of one response
    memory_mb: int = 2048
    max_output_bytes: int | None = None  # None: twice the expected output, at least 1 MiB
    stop_on_first_failure: bool = False
    execution: str = "per_response"  # one sandbox per response, or per_test (see distil_ray.feedback.code.harness)
    parallel_tests: int = 1  # tests of one response run at once
    max_feedback_tests: int = 2  # failing tests shown in the feedback
    max_feedback_chars: int = 2000
    field_chars: int = 300  # each input / expected / actual field of the feedback
    # other Sandbox options (isolation, max_processes, max_file_mb, ...; max_output_bytes here
    # takes precedence over the field above)
    sandbox_kwargs: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        check_choice("test_cases", self.test_cases, TEST_CASE_SOURCES)
        check_choice("prompt_style", self.prompt_style, PROMPT_STYLES)
        check_choice("extraction", self.extraction, EXTRACTIONS)
        check_choice("stdout_compare", self.stdout_compare, STDOUT_COMPARES)
        check_choice("execution", self.execution, EXECUTION_MODES)
        if not isinstance(self.parallel_tests, int) or self.parallel_tests < 1:
            raise ValueError(f"parallel_tests={self.parallel_tests!r}: must be a positive integer")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction={self.train_fraction!r}: must lie in (0, 1]")
        for name in ("start_date", "end_date"):
            try:
                as_date(getattr(self, name))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name}={getattr(self, name)!r}: not an ISO date ({e})") from None
        for name in ("max_feedback_tests", "max_feedback_chars", "field_chars"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a non-negative integer")
        if self.sandbox_kwargs is not None and not isinstance(self.sandbox_kwargs, Mapping):
            raise ValueError(f"sandbox_kwargs={self.sandbox_kwargs!r}: must be a mapping of Sandbox options")
        own = [k for k in _OWN_FIELDS if k in (self.sandbox_kwargs or {})]
        if own:
            raise ValueError(f"sandbox_kwargs: {', '.join(own)} is set by the field of the same name, not here")
        for name in ("timeout_s", "total_timeout_s", "memory_mb"):
            check_positive(name, getattr(self, name))
        check_positive("max_output_bytes", self.max_output_bytes, optional=True)
        try:
            self.execution_limits()
        except (TypeError, ValueError) as e:
            raise ValueError(f"sandbox_kwargs={dict(self.sandbox_kwargs or {})!r}: {e}") from None

    def execution_limits(self) -> ExecutionLimits:
        """How each response's tests run (the harness's limits and the sandbox's)."""
        options = dict(self.sandbox_kwargs or {})
        cap = options.pop("max_output_bytes", self.max_output_bytes)
        limit_options, setting_options = split_sandbox_options(options)
        return ExecutionLimits(
            timeout_s=self.timeout_s,
            total_timeout_s=self.total_timeout_s,
            max_output_bytes=cap,
            stop_on_first_failure=self.stop_on_first_failure,
            stdout_compare=self.stdout_compare,
            execution=self.execution,
            parallel_tests=self.parallel_tests,
            sandbox=SandboxLimits(memory_mb=self.memory_mb, **limit_options),
            settings=SandboxSettings(**setting_options),
        )

    def feedback_format(self) -> FeedbackFormat:
        return FeedbackFormat(self.max_feedback_tests, self.max_feedback_chars, self.field_chars)
