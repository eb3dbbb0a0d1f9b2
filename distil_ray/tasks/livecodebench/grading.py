"""The LiveCodeBench task: its examples (:mod:`.data`) and grading a response by running the
extracted program (:mod:`.prompts`) on the example's tests in the code harness
(:mod:`distil_ray.feedback.code`)."""

from __future__ import annotations

from typing import Any, Iterable

from distil_ray.feedback.code import ExecutionLimits, FeedbackFormat, check_program
from distil_ray.tasks.base import Grade, TaskExample, resolve_config
from distil_ray.tasks.livecodebench.config import LiveCodeBenchConfig
from distil_ray.tasks.livecodebench.data import as_date, example_from_record, examples_from_records, load_examples
from distil_ray.tasks.livecodebench.prompts import extract_code

NO_CODE_FEEDBACK = "No code found: the response has no ```python code block."


def grade_response(example: TaskExample, response: str, limits: ExecutionLimits = ExecutionLimits(),
                   fmt: FeedbackFormat = FeedbackFormat(), *, extraction: str = "last_python",
                   feedback_on_success: bool = True) -> Grade:
    """Reward 1 only when every test passes; ``score``: the fraction passed; ``feedback``: the
    harness's text (or a note that the response holds no code; empty for a response that passes
    every test when ``feedback_on_success`` is False)."""
    ref = example.reference
    tests = ref["tests"]
    code = extract_code(response, extraction)
    if code is None or not code.strip():
        return Grade(reward=0.0, correct=False, score=0.0, feedback=NO_CODE_FEEDBACK, answer=None,
                     details={"statuses": [], "n_passed": 0, "n_tests": len(tests), "has_code": False})
    v = check_program(code, tests, testtype=ref["testtype"], func_name=ref.get("func_name"), limits=limits, fmt=fmt)
    return Grade(
        reward=1.0 if v.correct else 0.0,
        correct=v.correct,
        score=v.score,
        feedback=v.feedback if (feedback_on_success or not v.correct) else "",
        answer=None,
        details={
            "statuses": v.statuses,
            "test_wall_s": [round(r.wall_s, 4) for r in v.results],
            "n_passed": v.n_passed,
            "n_tests": v.n_tests,
            "has_code": True,
            "sandbox_error": any(r.status == "sandbox_error" for r in v.results),
            "wall_s": v.wall_s,
        },
    )


class LiveCodeBenchTask:
    """LiveCodeBench v6 code generation (see the package docstring for splits, harness, feedback)."""

    name = "livecodebench"
    config_class = LiveCodeBenchConfig

    def __init__(self, cfg: LiveCodeBenchConfig | None = None):
        self.cfg = resolve_config(LiveCodeBenchConfig, cfg, self.name)
        self.window = (as_date(self.cfg.start_date), as_date(self.cfg.end_date))
        self.limits = self.cfg.execution_limits()
        self.feedback_format = self.cfg.feedback_format()

    # -- data -----------------------------------------------------------------------------------

    def _example_options(self) -> dict[str, Any]:
        c = self.cfg
        return {"test_cases": c.test_cases, "train_fraction": c.train_fraction, "seed": c.seed,
                "system_prompt": c.system_prompt, "prompt_style": c.prompt_style}

    def to_example(self, record: dict[str, Any], split: str) -> TaskExample:
        """One hub record as an example of ``split`` (no date filter)."""
        return example_from_record(record, split, **self._example_options())

    def examples_from_records(self, records: Iterable[dict[str, Any]], split: str) -> list[TaskExample]:
        """Date-filter and convert in-memory records (a ``ValueError`` names the record)."""
        return examples_from_records(records, split, self.window, **self._example_options())

    def load(self, split: str) -> list[TaskExample]:
        c = self.cfg
        hub = {"version_tag": c.version_tag, "revision": c.revision, "trust_remote_code": c.trust_remote_code}
        return load_examples(c.source, split, self.window, hub, **self._example_options())

    # -- grading --------------------------------------------------------------------------------

    def grade(self, example: TaskExample, response: str) -> Grade:
        return grade_response(example, response, self.limits, self.feedback_format,
                              extraction=self.cfg.extraction, feedback_on_success=self.cfg.feedback_on_success)
