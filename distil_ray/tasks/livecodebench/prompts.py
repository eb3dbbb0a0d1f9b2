"""What the student sees of a LiveCodeBench problem and how its program is taken back out of the
response.

Prompt styles (``prompt_style``):

* ``lcb``: LiveCodeBench's own layout: ``### Question:``, a format instruction with the starter
  code (or ``# YOUR CODE HERE`` for stdin problems), ``### Answer:``; after the system prompt.
* ``sdpo``: SDPO's (lasgroup/SDPO ``data/format/prompts.py: CODE_PROMPT``, ``data/utils/
  livecodebench.py: format_prompt``): one paragraph of instructions, then the question and, for
  functional problems, only the method's signature (``def f(self, ...) -> T:``) in a code block.

Extraction (``extraction``):

* ``last_python``: the last ```` ```python ```` block (fallback: the last fenced block of any language);
* ``longest``: SDPO's rule (``verl/utils/reward_score/feedback/code.py: extract_code``): the longest
  block opened by ```` ``` ```` + an optional word + a newline, whatever its language (the first of
  equally long ones).
"""

from __future__ import annotations

import re

SYSTEM_PROMPT = (
    "You are an expert Python programmer. You will be given a programming problem and must write a "
    "correct Python program that meets the specification and passes all tests. Give the complete "
    "program in a single ```python code block."
)
# SDPO's code instructions (data/format/prompts.py:3), word for word: the time limit it names is
# not the one its grader applies (6 s per test).
CODE_PROMPT = (
    "You are a coding expert. You will be given a coding problem, and you need to write a correct "
    "Python program that matches the specification and passes all tests. The time limit is 1 second. "
    "You may start by outlining your thought process. In the end, please provide the complete code "
    "in a code block enclosed with ``` ```.\n\n{problem}"
)
PROMPT_STYLES = ("lcb", "sdpo")
EXTRACTIONS = ("last_python", "longest")

_FORMAT_STARTER = (
    "Complete the following starter code and enclose your whole solution in a ```python code block."
)
_FORMAT_STDIN = (
    "Read the input from standard input, solve the problem and write the answer to standard output "
    "(do not hard-code the sample inputs). Enclose your code in a ```python code block as follows."
)


def starter_signature(starter_code: str) -> str:
    """The ``def`` line of a starter (``class Solution:\n    def f(self, x: int) -> int:\n``
    → ``def f(self, x: int) -> int:``); the stripped starter when it has no ``def``."""
    if "def " not in starter_code:
        return starter_code.strip()
    return "def " + starter_code.split("def ", 1)[1].split("Input\n")[0].strip()


def build_prompt(question_content: str, starter_code: str, system_prompt: str | None = SYSTEM_PROMPT,
                 style: str = "lcb") -> list[dict[str, str]]:
    """The chat messages of one problem in ``style`` (see the module docstring)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if style == "sdpo":
        problem = question_content
        if starter_code.strip():
            problem += ("\n\nYour solution should have the following signature: "
                        f"```python\n{starter_signature(starter_code)}\n```")
        return messages + [{"role": "user", "content": CODE_PROMPT.format(problem=problem)}]
    if style != "lcb":
        raise ValueError(f"prompt_style={style!r}: must be one of {', '.join(PROMPT_STYLES)}")
    user = f"### Question:\n{question_content}\n\n"
    if starter_code.strip():
        user += f"### Format: {_FORMAT_STARTER}\n```python\n{starter_code.rstrip()}\n```\n\n"
    else:
        user += f"### Format: {_FORMAT_STDIN}\n```python\n# YOUR CODE HERE\n```\n\n"
    user += "### Answer: (use the provided format with backticks)\n\n"
    return messages + [{"role": "user", "content": user}]


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#.\-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PY_TAGS = {"python", "python3", "py", "py3"}


_SDPO_FENCE = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)


def extract_code(response: str, rule: str = "last_python") -> str | None:
    """The program in ``response`` by ``rule`` (see the module docstring); None if it has no block."""
    if rule == "longest":
        bodies = [m.group(2) for m in _SDPO_FENCE.finditer(response or "")]
        return max(bodies, key=len) if bodies else None
    if rule != "last_python":
        raise ValueError(f"extraction={rule!r}: must be one of {', '.join(EXTRACTIONS)}")
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(response or "")]
    for tag, body in reversed(blocks):
        if tag in _PY_TAGS:
            return body
    return blocks[-1][1] if blocks else None
