"""The records that travel between actors (DESIGN §4).

Plain dataclasses of numpy arrays and Python scalars: cheap to put in Ray's object store (numpy
arrays are read zero-copy by ``ray.get``) and free of any torch or Ray dependency. Each stage adds
fields to the previous record: Rollout → Graded → Scored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distil_ray.tasks.base import TaskExample


@dataclass
class Prompt:
    """A task example as the engines see it: the example (what the student is shown, and the
    reference data — answer key, tests, solution — that never enters the student's context) plus
    its chat-templated token ids. One object-store copy serves the rollout workers, the graders
    and the teacher."""

    example: TaskExample
    prompt_ids: np.ndarray  # [P] int32, the chat-templated prompt

    @property
    def uid(self) -> str:
        return self.example.uid

    @property
    def task(self) -> str:
        return self.example.task

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.example.messages

    @property
    def reference(self) -> dict[str, Any]:
        return self.example.reference

    @property
    def meta(self) -> dict[str, Any]:
        return self.example.meta

    def without_reference(self) -> "Prompt":
        """The same prompt without its reference data: all a rollout worker needs (a large test
        set then does not travel to the engines every round)."""
        return Prompt(dataclasses.replace(self.example, reference={}), self.prompt_ids)


@dataclass
class Rollout:
    prompt_uid: str
    sample_index: int  # index within the prompt's group of samples
    response_ids: np.ndarray  # [T] int32
    behaviour_logprobs: np.ndarray  # [T] float32, log-probs under the policy that sampled it
    finish_reason: str  # "stop" | "length" | ...
    policy_version: int
    text: str  # decoded response
    prompt_ids: np.ndarray  # [P] int32, the student's prompt: the learner scores prompt + response


@dataclass
class Graded(Rollout):
    reward: float = 0.0
    correct: bool = False
    score: float = 0.0  # partial credit (e.g. fraction of tests passed)
    feedback: str = ""  # execution trace, grader message
    answer: str | None = None  # extracted final answer (for maj@k)
    demonstration: str | None = None  # a successful sibling's response, when one exists
    sandbox_error: bool = False  # the grader could not run the program (a failure of the sandbox, not the code)

    @classmethod
    def from_rollout(cls, rollout: Rollout, **fields) -> "Graded":
        return cls(**_fields_of(rollout), **fields)


@dataclass
class Scored(Graded):
    teacher_topk_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))  # [T, k]
    teacher_topk_logprobs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # [T, k]
    teacher_token_logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # [T]
    distill_mask: bool = False  # False when neither feedback nor a demonstration exists
    # [P'] int32, the teacher's chat-templated context (its prompt; the response follows it) where
    # the record was scored or is to be scored on the learner (teacher.backend=learner); else empty
    teacher_prompt_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    @classmethod
    def from_graded(cls, graded: Graded, **fields) -> "Scored":
        return cls(**_fields_of(graded), **fields)


def _fields_of(record) -> dict[str, Any]:
    # shallow on purpose: arrays are shared, not copied, as they move from one stage to the next
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
