r"""What the student sees of a math problem: the problem, then the instruction to box the answer."""

from __future__ import annotations

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def build_messages(problem: str, instruction: str = INSTRUCTION, system_prompt: str | None = None) -> list[dict[str, str]]:
    user = problem.rstrip() + "\n" + instruction if instruction else problem
    messages = [{"role": "user", "content": user}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages
