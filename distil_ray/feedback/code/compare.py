"""Whether a program's output is right, as the official LiveCodeBench harness decides.

* stdin tests (:func:`compare_stdout`): both texts are ``strip()``-ed, split on ``"\\n"`` and each
  line ``strip()``-ed; the line counts must be equal (so leading/trailing blank lines and trailing
  spaces do not matter, but a blank line *inside* the output does); lines that differ as strings
  are split on whitespace and every token converted with ``decimal.Decimal``; the lines match when
  both convert and the lists of values are equal. This is exact decimal equality, not a
  tolerance: ``1.0 == 1`` and ``1e3 == 1000``, but ``0.30000001 != 0.3``. A comparison that raises
  (signalling NaN) is a mismatch.
* stdin tests, ``mode="exact"`` (SDPO's rule, lasgroup/SDPO ``verl/utils/reward_score/feedback/
  code.py: run_test_std``): an expected output ending in ``-`` loses it (from its last ``-``); then
  each text is ``strip()``-ed, its newlines replaced by spaces and its carriage returns dropped, and
  the two strings must be equal: ``"1.0" != "1"`` and ``"a  b" != "a b"``.
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


STDOUT_COMPARES = ("decimal", "exact")


def _one_line(text: str) -> str:
    return text.strip().replace("\n", " ").replace("\r", "")


def compare_stdout_exact(actual: str, expected: str) -> bool:
    """SDPO's stdin comparison (see the module docstring)."""
    expected = expected.strip()
    if expected.endswith("-"):
        expected = expected[: expected.rfind("-")].rstrip()
    return _one_line(actual) == _one_line(expected)


def compare_stdout(actual: str, expected: str, mode: str = "decimal") -> bool:
    """A stdin test's output against the expected one: the official harness's comparison
    (``decimal``) or SDPO's (``exact``); see the module docstring."""
    if mode == "exact":
        return compare_stdout_exact(actual, expected)
    if mode != "decimal":
        raise ValueError(f"stdout_compare={mode!r}: must be one of {', '.join(STDOUT_COMPARES)}")
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
