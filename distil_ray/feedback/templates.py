"""Feedback → teacher context: what the teacher sees that the student did not.

SDPO's reprompt scheme: the teacher's last user turn is
``reprompt_template.format(prompt=..., solution=..., feedback=...)`` where the solution block shows a
*successful sibling* rollout of the same prompt (never the sample's own; ``<think>…</think>``
stripped) and the feedback block the environment's feedback on this sample (by default only when no
sibling solution exists). A sample with neither gets no teacher context, hence no distillation
signal: the learner masks it out, and ``reprompt_stats`` counts it.

OPSD's scheme puts the task's reference solution in the teacher's context instead.
The teacher's *response* is always the student's response token ids, appended by the scorer —
never re-tokenised text — so nothing here touches the response.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Sequence

_THINK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


@dataclass
class RepromptConfig:
    """How the teacher's context is built (the ``teacher.reprompt`` config section)."""

    reprompt_template: str = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
    solution_template: str = "\nCorrect solution:\n\n{successful_previous_attempt}"
    feedback_template: str = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}"
    include_environment_feedback: bool = True
    # a successful sibling's answer in the context; False: feedback-only contexts (where a sibling's
    # answer would give away what the feedback is meant to teach, e.g. the two-formats task's format)
    include_solution: bool = True
    feedback_only_without_solution: bool = True  # SDPO's default: a sibling's solution beats raw feedback
    dont_reprompt_on_self_success: bool = True  # a sample is never its own demonstration
    strip_thinking: bool = True
    success_threshold: float = 0.5  # reward at or above which a rollout counts as a solution

    # The templates are str.format()-ed with exactly these names (reprompt_group below).
    PLACEHOLDERS: ClassVar[dict[str, dict[str, str]]] = {
        "reprompt_template": {"prompt": "p", "solution": "s", "feedback": "f"},
        "solution_template": {"successful_previous_attempt": "a"},
        "feedback_template": {"feedback_raw": "f"},
    }

    def check(self) -> None:
        """Raise ValueError naming the first template that cannot be formatted."""
        for name, fields in self.PLACEHOLDERS.items():
            try:
                getattr(self, name).format(**fields)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"{name}: cannot be formatted ({type(e).__name__}: {e}); "
                    f"allowed placeholders are {', '.join('{' + f + '}' for f in fields)}"
                ) from None


OPSD_TEMPLATE = (
    "{prompt}\n\nHere is a reference solution to this problem:\n{reference_solution}\n\n\n"
    "After understanding the reference solution and the rationale behind each step, now articulate your own "
    "step-by-step reasoning that derives the same final answer to the problem below:\n\n"
    "Please reason step by step, and put your final answer within \\boxed{{}}."
)


@dataclass
class TeacherContext:
    messages: list[dict[str, str]] | None  # None: no feedback and no demonstration → no signal
    used_solution: bool = False
    used_feedback: bool = False
    demonstration: str | None = None  # the sibling's solution placed in the context, if one was

    @property
    def has_signal(self) -> bool:
        return self.messages is not None


def strip_thinking(text: str) -> str:
    return _THINK.sub("", text)


def _with_last_user_turn(prompt_messages: Sequence[dict], content: str) -> list[dict]:
    if not prompt_messages or prompt_messages[-1].get("role") != "user":
        raise ValueError("the prompt must end with a user message to be reprompted")
    return [dict(m) for m in prompt_messages[:-1]] + [{"role": "user", "content": content}]


def reprompt_group(
    prompt_messages: Sequence[dict],
    responses: Sequence[str],
    rewards: Sequence[float],
    feedbacks: Sequence[str | None],
    cfg: RepromptConfig | None = None,
) -> list[TeacherContext]:
    """Teacher contexts for every rollout of one prompt (a group of siblings)."""
    cfg = cfg or RepromptConfig()
    if not len(responses) == len(rewards) == len(feedbacks):
        raise ValueError("responses, rewards and feedbacks must have one entry per rollout")
    prompt = prompt_messages[-1]["content"]
    successes = [i for i, r in enumerate(rewards) if r >= cfg.success_threshold]
    contexts = []
    for i in range(len(responses)):
        # the first successful sibling: deterministic, and rollouts are exchangeable, so it is a random one
        donors = [j for j in successes if cfg.include_solution
                  and not (cfg.dont_reprompt_on_self_success and j == i)]
        solution = responses[donors[0]] if donors else None
        if solution is not None and cfg.strip_thinking:
            solution = strip_thinking(solution)
        feedback = feedbacks[i] if cfg.include_environment_feedback else None
        use_feedback = bool(feedback and feedback.strip()) and not (cfg.feedback_only_without_solution and solution is not None)
        if solution is None and not use_feedback:
            contexts.append(TeacherContext(None))
            continue
        text = cfg.reprompt_template.format(
            prompt=prompt,
            solution=cfg.solution_template.format(successful_previous_attempt=solution) if solution is not None else "",
            feedback=cfg.feedback_template.format(feedback_raw=feedback) if use_feedback else "",
        )
        contexts.append(TeacherContext(_with_last_user_turn(prompt_messages, text), solution is not None, use_feedback, solution))
    return contexts


def reference_solution_context(
    prompt_messages: Sequence[dict], reference_solution: str | None, template: str = OPSD_TEMPLATE,
    problem: str | None = None,
) -> TeacherContext:
    """OPSD: the teacher sees the task's reference solution (no signal where the task has none).
    ``problem``: the bare problem where the task keeps one (math: ``reference["problem"]``), which
    OPSD's teacher prompt restates in place of the student's whole turn — the template ends with the
    instruction itself, so the student's copy of it would appear twice (data_collator.py:82-87)."""
    if not reference_solution:
        return TeacherContext(None)
    stated = problem if problem is not None else prompt_messages[-1]["content"]
    text = template.format(prompt=stated, reference_solution=reference_solution)
    return TeacherContext(_with_last_user_turn(prompt_messages, text), used_solution=True)


def reprompt_stats(contexts: Sequence[TeacherContext]) -> dict[str, float]:
    n = max(len(contexts), 1)
    return {
        "reprompt/with_solution": sum(c.used_solution for c in contexts) / n,
        "reprompt/with_feedback": sum(c.used_feedback for c in contexts) / n,
        "reprompt/no_signal": sum(not c.has_signal for c in contexts) / n,
        "reprompt/no_signal_count": float(sum(not c.has_signal for c in contexts)),
    }
