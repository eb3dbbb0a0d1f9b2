"""SDPO's reprompt scheme and OPSD's reference-solution context."""

import pytest

from distil_ray.feedback.templates import (
    RepromptConfig,
    reference_solution_context,
    reprompt_group,
    reprompt_stats,
    strip_thinking,
)

PROMPT = [{"role": "system", "content": "Answer in tags."}, {"role": "user", "content": "What is 2+2?"}]


def test_sibling_solution_is_used_never_own_and_thinking_is_stripped():
    responses = ["<think>hmm</think>\n<answer>4</answer>", "<answer>5</answer>", "<answer>3</answer>"]
    contexts = reprompt_group(PROMPT, responses, [1.0, 0.0, 0.0], [None, "wrong: 5", "wrong: 3"])
    # the successful rollout has no successful sibling and no feedback → no signal
    assert contexts[0].messages is None
    for c in contexts[1:]:
        assert c.used_solution and not c.used_feedback  # feedback is ignored when a solution exists
        assert c.messages[0] == PROMPT[0]  # system turn kept
        assert c.messages[-1]["content"] == (
            "What is 2+2?\nCorrect solution:\n\n<answer>4</answer>\n\nCorrectly solve the original question."
        )
    assert reprompt_stats(contexts)["reprompt/no_signal_count"] == 1.0


def test_feedback_used_when_no_sibling_succeeded():
    contexts = reprompt_group(PROMPT, ["<answer>5</answer>", "<answer>6</answer>"], [0.0, 0.0], ["The answer 5 is wrong.", None])
    assert contexts[0].used_feedback and not contexts[0].used_solution
    assert contexts[0].messages[-1]["content"] == (
        "What is 2+2?\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
        "The answer 5 is wrong.\n\nCorrectly solve the original question."
    )
    assert contexts[1].messages is None  # neither feedback nor a solution
    stats = reprompt_stats(contexts)
    assert stats["reprompt/with_feedback"] == 0.5 and stats["reprompt/no_signal"] == 0.5


def test_both_blocks_when_configured():
    cfg = RepromptConfig(feedback_only_without_solution=False)
    contexts = reprompt_group(PROMPT, ["a", "b"], [1.0, 0.0], [None, "fb"], cfg)
    text = contexts[1].messages[-1]["content"]
    assert text.index("Correct solution") < text.index("feedback from your unsuccessful") and text.endswith("question.")
    # self-success as own demonstration only when explicitly allowed
    contexts = reprompt_group(PROMPT, ["a"], [1.0], [None], RepromptConfig(dont_reprompt_on_self_success=False))
    assert contexts[0].used_solution


def test_feedback_can_be_disabled():
    contexts = reprompt_group(PROMPT, ["x"], [0.0], ["fb"], RepromptConfig(include_environment_feedback=False))
    assert contexts[0].messages is None


def test_reference_solution_context():
    ctx = reference_solution_context(PROMPT, "2+2=4, so \\boxed{4}.")
    assert "Here is a reference solution to this problem:\n2+2=4, so \\boxed{4}." in ctx.messages[-1]["content"]
    assert ctx.messages[-1]["content"].startswith("What is 2+2?")
    assert ctx.messages[-1]["content"].endswith("within \\boxed{}.")
    assert reference_solution_context(PROMPT, None).messages is None


def test_strip_thinking_and_bad_input():
    assert strip_thinking("<think>a\nb</think>\n\nfinal <think>c</think>x") == "final x"
    with pytest.raises(ValueError, match="one entry per rollout"):
        reprompt_group(PROMPT, ["a", "b"], [1.0], [None, None])
    with pytest.raises(ValueError, match="user message"):
        reprompt_group([{"role": "system", "content": "s"}], ["a", "b"], [1.0, 0.0], [None, None])
