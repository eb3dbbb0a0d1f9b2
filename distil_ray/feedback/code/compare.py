"""Whether a program's output is right, as the official LiveCodeBench harness decides.

* stdin tests (:func:`compare_stdout`): both texts are ``strip()``-ed, split on ``"\\n"`` and each
  line ``strip()``-ed; the line counts must be equal (so leading/trailing blank lines and trailing
  spaces do not matter, but a blank line *inside* the output does); lines that differ as strings
  are split on whitespace and every token converted with ``decimal.Decimal``; the lines match when
  both convert and the lists of values are equal. This is exact decimal equality, not a
  tolerance: ``1.0 == 1`` and ``1e3 == 1000``, but ``0.30000001 != 0.3``. A comparison that raises
  (signalling NaN) is a mismatch.
* functional tests (:func:`compare_functional`): the returned value after a JSON round trip
  (tuples become lists) ``==`` the expected output parsed as JSON (Python equality, so
  ``1 == 1.0``).
"""

from __future__ import annotations

import json
from decimal import Decimal


def _stripped_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(tok) for tok in line.split()]
    except Exception:
        return None


def compare_stdout(actual: str, expected: str) -> bool:
    """The official harness's stdin comparison (see the module docstring)."""
    got, want = _stripped_lines(actual), _stripped_lines(expected)
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if g == w:
            continue
        dg, dw = _decimals(g), _decimals(w)
        if dg is None or dw is None:
            return False
        try:
            if dg != dw:
                return False
        except Exception:  # signalling NaN
            return False
    return True


def compare_functional(actual_json: str, expected_json: str) -> bool:
    """A functional test's returned value (JSON text) against the expected output (JSON text;
    an expected output that is not JSON is compared as stripped text)."""
    try:
        got = json.loads(actual_json)
    except ValueError:
        return False
    try:
        want = json.loads(expected_json)
    except ValueError:
        return actual_json.strip() == expected_json.strip()
    try:
        return bool(got == want)
    except Exception:
        return False
