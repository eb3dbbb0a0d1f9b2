"""What the student sees of a SciKnowEval question: the system prompt of the processed files (used
for every question, the two-option ones included) and the text a raw hub record is rendered into."""

from __future__ import annotations

SYSTEM_PROMPT = """
Given a question and four options, please select the right answer. Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>

For the answer, only output the letter corresponding to the correct option (A, B, C, or D), and nothing else. Do not restate the answer text. For example, if the answer is "A", just output:
<answer>
A
</answer>
"""
PROMPT_SUFFIX = "\nPlease reason step by step."
DESCRIPTION_SUFFIX = " The solution will be evaluated in a mcq environment."


def render_question(question: str, labels: list[str], texts: list[str]) -> str:
    """``question + "\\n\\n" + "\\n".join(f"{label}: {text}") + "\\nPlease reason step by step."``"""
    options = "\n".join(f"{label}: {text}" for label, text in zip(labels, texts))
    return question + "\n\n" + options + PROMPT_SUFFIX


def messages_for(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system or SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
