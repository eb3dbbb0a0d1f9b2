"""What the student sees of a LiveCodeBench problem (question, format instruction, starter code)
and how its program is taken back out of the response: the last ```` ```python ```` block
(fallback: the last fenced block of any language)."""

from __future__ import annotations

import re

SYSTEM_PROMPT = (
    "You are an expert Python programmer. You will be given a programming problem and must write a "
    "correct Python program that meets the specification and passes all tests. Give the complete "
    "program in a single ```python code block."
)
_FORMAT_STARTER = (
    "Complete the following starter code and enclose your whole solution in a ```python code block."
)
_FORMAT_STDIN = (
    "Read the input from standard input, solve the problem and write the answer to standard output "
    "(do not hard-code the sample inputs). Enclose your code in a ```python code block as follows."
)


def build_prompt(question_content: str, starter_code: str, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """LiveCodeBench-style chat messages: question, format instruction (+ starter code), answer cue."""
    user = f"### Question:\n{question_content}\n\n"
    if starter_code.strip():
        user += f"### Format: {_FORMAT_STARTER}\n```python\n{starter_code.rstrip()}\n```\n\n"
    else:
        user += f"### Format: {_FORMAT_STDIN}\n```python\n# YOUR CODE HERE\n```\n\n"
    user += "### Answer: (use the provided format with backticks)\n\n"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": user}]


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#.\-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PY_TAGS = {"python", "python3", "py", "py3"}


def extract_code(response: str) -> str | None:
    """The last ```` ```python ```` block of the response (fallback: the last fenced block)."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(response or "")]
    for tag, body in reversed(blocks):
        if tag in _PY_TAGS:
            return body
    return blocks[-1][1] if blocks else None
