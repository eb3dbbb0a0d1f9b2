r"""Final answers as text: the last ``\boxed{...}`` of a response (braces matched) and the
canonical string two answers are compared by before math-verify is asked."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> list[str]:
    r"""Contents of every complete ``\boxed{...}`` / ``\fbox{...}`` in order, braces matched.

    ``\boxed 5`` (no braces) yields ``"5"``; a box whose braces never close (a truncated response)
    is skipped.
    """
    out: list[tuple[int, str]] = []
    for cmd in _BOX_COMMANDS:
        start = 0
        while True:
            i = text.find(cmd, start)
            if i < 0:
                break
            start = i + len(cmd)
            j = start
            if j < len(text) and text[j].isalpha():  # another command, e.g. \boxedx
                continue
            while j < len(text) and text[j] == " ":
                j += 1
            if j < len(text) and text[j] == "{":
                depth, k = 0, j
                while k < len(text):
                    ch = text[k]
                    if ch == "\\" and k + 1 < len(text) and text[k + 1] in "{}":
                        k += 2  # an escaped brace \{ or \} does not count
                        continue
                    if ch == "{":
                        depth += 1
                    elif ch == "}":
                        depth -= 1
                        if depth == 0:
                            out.append((i, text[j + 1 : k]))
                            break
                    k += 1
            elif j > start:  # "\boxed 5": one token up to whitespace or '$'
                m = re.match(r"[^\s$]+", text[j:])
                if m:
                    out.append((i, m.group(0)))
    return [content for _, content in sorted(out)]


def last_boxed(text: str) -> str | None:
    r"""The content of the last complete ``\boxed{}`` / ``\fbox{}``, or ``None``."""
    boxes = extract_boxed(text)
    return boxes[-1] if boxes else None


def _unwrap(s: str, commands: Sequence[str]) -> str:
    """Replace ``\\cmd{X}`` by ``X`` (innermost first, brace-free contents), repeatedly."""
    pattern = re.compile(r"\\(?:%s)\s*\{([^{}]*)\}" % "|".join(commands))
    while True:
        new = pattern.sub(r"\1", s)
        if new == s:
            return s
        s = new


_INT = re.compile(r"[+-]?\d+(?:\.0*)?")


def normalize_answer(answer: Any) -> str:
    r"""A canonical string for comparing final answers.

    Strips ``$``, spaces and LaTeX spacing (``\!``, ``\,``, ``\;``, ``\:``, ``~``), ``\left`` /
    ``\right``, ``\text{}``-like wrappers, degree marks (``^\circ``), trailing periods; maps
    ``\dfrac`` / ``\tfrac`` to ``\frac``; writes integers without leading zeros or ``.0``.
    """
    s = str(answer).strip()
    s = s.strip("$")
    s = _unwrap(s, ("text", "textbf", "textit", "mathrm", "mathbf", "mbox", "boxed"))
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\[!,;:> ]", "", s)
    s = s.replace("~", "")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°", "", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    s = s.strip("$")
    # AoPS-style choice answers box the number in parentheses: \textbf{(073)}
    s = re.sub(r"^\((-?\d+)\)$", r"\1", s)
    if _INT.fullmatch(s):
        sign = "-" if s.startswith("-") else ""
        digits = s.lstrip("+-").split(".")[0].lstrip("0") or "0"
        s = "0" if digits == "0" else sign + digits
    return s


def answer_to_str(value: Any) -> str:
    """A reference answer as text: integral floats lose their ``.0`` (AMC stores ``27.0``)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()
