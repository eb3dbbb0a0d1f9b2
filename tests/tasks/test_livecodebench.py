"""LiveCodeBench task: test decoding (incl. a refused malicious pickle), splits, prompt, and
grading real and synthetic programs through the code sandbox."""

from __future__ import annotations

import base64
import json
import os
import pickle
import random
import sys
import uuid
import zlib
from pathlib import Path

import pytest

from distil_ray.tasks.base import DataFormatError
from distil_ray.tasks.livecodebench import (
    LiveCodeBenchConfig,
    LiveCodeBenchTask,
    UnsafePickleError,
    compare_functional,
    compare_stdout,
    decode_private_tests,
    encode_private_tests,
    example_from_record,
    extract_code,
    select_train_tests,
)

from tests.shared_data import SHARED_DATA

DATA = SHARED_DATA
SAMPLES = DATA / "samples"
RECORDS = SAMPLES / "livecodebench_records.jsonl"
DECODED = SAMPLES / "livecodebench_1873_A_private_tests_decoded.json"

needs_data = pytest.mark.skipif(
    not RECORDS.exists() or not DECODED.exists(),
    reason=f"LiveCodeBench sample records not found under {SAMPLES} (the shared data folder beside the repo)",
)


def _records() -> list[dict]:
    return [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()]


def _stdin_example(split="test"):
    return example_from_record(_records()[0], split)


def _functional_record() -> dict:
    rec = dict(_records()[1])
    assert "question_content" not in rec  # the sample is a partial projection
    rec.pop("_note", None)
    rec["question_content"] = (
        "You are given an m x n grid of positive integers. Traverse it in a zigzag pattern (row 0 left to "
        "right, row 1 right to left, and so on) while skipping every alternate cell. Return the visited "
        "values in order."
    )
    # tests derived from the public tests plus the problem's third worked example
    public = json.loads(rec["public_test_cases"])
    extra = {"input": "[[1, 2, 3], [4, 5, 6], [7, 8, 9]]", "output": "[1, 3, 5, 7, 9]", "testtype": "functional"}
    rec["public_test_cases"] = json.dumps(public + [extra])
    return rec


def _resp(code: str) -> str:
    return f"Let me think.\n\n```python\n{code.strip()}\n```\n"


SHORT_SORT_OK = """
t = int(input())
for _ in range(t):
    s = input().strip()
    wrong = sum(a != b for a, b in zip(s, "abc"))
    print("YES" if wrong != 3 else "NO")
"""

ZIGZAG_OK = """
class Solution:
    def zigzagTraversal(self, grid: List[List[int]]) -> List[int]:
        seq = []
        for i, row in enumerate(grid):
            seq.extend(row if i % 2 == 0 else row[::-1])
        print("debug output is ignored")
        return seq[::2]
"""


# --------------------------------------------------------------------------- decoding


@needs_data
def test_decode_real_private_tests_matches_decoded_file():
    decoded = decode_private_tests(_records()[0]["private_test_cases"])
    assert decoded == json.loads(DECODED.read_text())
    assert len(decoded) == 4 and all(t["testtype"] == "stdin" for t in decoded)
    assert decode_private_tests(encode_private_tests(decoded)) == decoded


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _evil_payload(marker: Path) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(_Evil(f"touch {marker}")))).decode()


def test_malicious_pickle_is_refused(tmp_path):
    marker = Path("/tmp") / f"lcb_pickle_marker_{uuid.uuid4().hex}"
    payload = _evil_payload(marker)
    try:
        with pytest.raises(UnsafePickleError, match="refusing to load global"):
            decode_private_tests(payload)
        assert not marker.exists()
        # also through the loader: the error names the file and line
        rec = {"question_id": "evil", "question_content": "q", "contest_date": "2025-03-01T00:00:00",
               "public_test_cases": "[]", "private_test_cases": payload, "metadata": "{}"}
        f = tmp_path / "evil.jsonl"
        f.write_text(json.dumps(rec) + "\n")
        with pytest.raises(DataFormatError) as ei:
            LiveCodeBenchTask(LiveCodeBenchConfig(source=f)).load("test")
        assert ei.value.line == 1 and str(f) in str(ei.value) and "UnsafePickleError" in str(ei.value)
        assert not marker.exists()
    finally:
        if marker.exists():
            marker.unlink()


def test_non_plain_payloads_are_refused():
    # a pickled set / a pickled object of an allowed-looking class also needs a global
    for obj in ({1, 2}, Path("x")):
        with pytest.raises(UnsafePickleError):
            decode_private_tests(base64.b64encode(zlib.compress(pickle.dumps(obj))).decode())
    with pytest.raises(ValueError):
        decode_private_tests("not base64 !!")


# --------------------------------------------------------------------------- loading, splits, prompt


def _synthetic(qid: str, date: str, n_private: int) -> dict:
    priv = [{"input": f"{i}\n", "output": f"{i}\n", "testtype": "stdin"} for i in range(n_private)]
    return {
        "question_title": qid, "question_content": f"Echo the number ({qid}).", "platform": "atcoder",
        "question_id": qid, "contest_id": "c", "contest_date": date, "starter_code": "", "difficulty": "easy",
        "public_test_cases": json.dumps([{"input": "100\n", "output": "100\n", "testtype": "stdin"}]),
        "private_test_cases": encode_private_tests(priv), "metadata": "{}",
    }


def test_date_window_and_half_test_split_are_deterministic(tmp_path):
    recs = [
        _synthetic("before", "2025-01-31T23:59:59", 5),
        _synthetic("first_day", "2025-02-01T00:00:00", 9),
        _synthetic("mid", "2025-03-15T12:30:00", 0),  # a single (public) test
        _synthetic("last", "2025-04-30T23:00:00", 20),
        _synthetic("after", "2025-05-01T00:00:00", 3),
    ]
    f = tmp_path / "lcb.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    task = LiveCodeBenchTask(LiveCodeBenchConfig(source=f))
    test, train = task.load("test"), task.load("train")
    assert [e.meta["question_id"] for e in test] == ["first_day", "mid", "last"]
    assert [e.uid for e in train] == ["livecodebench/train/first_day", "livecodebench/train/mid", "livecodebench/train/last"]
    assert [len(e.reference["tests"]) for e in test] == [10, 1, 21]
    assert [len(e.reference["tests"]) for e in train] == [5, 1, 10]  # max(1, int(n * 0.5))
    for tr, te in zip(train, test):  # a subset, in the original order
        idx = [te.reference["tests"].index(t) for t in tr.reference["tests"]]
        assert idx == sorted(idx)
    # deterministic: the same subsets on reload and with a fresh task object, whatever else is loaded
    again = LiveCodeBenchTask(LiveCodeBenchConfig(source=f)).load("train")
    assert [e.reference for e in again] == [e.reference for e in train]
    alone = LiveCodeBenchTask(LiveCodeBenchConfig(source=f)).examples_from_records([recs[3]], "train")
    assert alone[0].reference == train[2].reference
    # the documented formula
    expect = sorted(random.Random("0:last").sample(range(21), 10))
    assert select_train_tests(list(range(21)), fraction=0.5, seed=0, key="last") == expect
    assert [test[2].reference["tests"][i] for i in expect] == train[2].reference["tests"]
    # configurable: another seed / fraction / window
    other = LiveCodeBenchTask(LiveCodeBenchConfig(source=f, seed=1)).load("train")
    assert [len(e.reference["tests"]) for e in other] == [5, 1, 10]
    assert LiveCodeBenchTask(LiveCodeBenchConfig(source=f, train_fraction=1.0)).load("train")[2].reference == test[2].reference
    assert len(LiveCodeBenchTask(LiveCodeBenchConfig(source=f, start_date=None, end_date=None)).load("test")) == 5
    private = LiveCodeBenchTask(LiveCodeBenchConfig(source=f, test_cases="private", end_date="2025-03-01"))
    assert len(private.load("test")[0].reference["tests"]) == 9
    assert select_train_tests([], seed=0) == []
    with pytest.raises(ValueError, match="valid splits: train, test"):
        task.load("validation")


def test_malformed_lines_name_file_and_line(tmp_path):
    good = json.dumps(_synthetic("ok", "2025-03-01T00:00:00", 2))
    f = tmp_path / "bad.jsonl"
    f.write_text(good + "\n\n{not json\n")
    with pytest.raises(DataFormatError) as ei:
        LiveCodeBenchTask(LiveCodeBenchConfig(source=f)).load("test")
    assert ei.value.line == 3 and str(f) in str(ei.value)
    bad_date = dict(_synthetic("x", "2025-03-01", 1), contest_date="someday")
    f.write_text(good + "\n" + json.dumps(bad_date) + "\n")
    with pytest.raises(DataFormatError) as ei:
        LiveCodeBenchTask(LiveCodeBenchConfig(source=f)).load("test")
    assert ei.value.line == 2


@needs_data
def test_sample_file_partial_record_is_a_format_error():
    # line 2 of the sample file lacks question_content (a partial projection)
    with pytest.raises(DataFormatError) as ei:
        LiveCodeBenchTask(LiveCodeBenchConfig(source=RECORDS, start_date=None, end_date=None)).load("test")
    assert ei.value.line == 2 and "question_content" in str(ei.value)
    # with the default v6 window both sample records are outside it and nothing is decoded
    assert LiveCodeBenchTask(LiveCodeBenchConfig(source=RECORDS)).load("test") == []


def test_hub_code_path(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return [_synthetic("hub", "2025-04-01T00:00:00", 4), _synthetic("old", "2024-04-01T00:00:00", 4)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = LiveCodeBenchConfig(source="livecodebench/code_generation_lite", version_tag="release_v6")
    exs = LiveCodeBenchTask(hub).load("train")
    assert [e.meta["question_id"] for e in exs] == ["hub"]
    name, kwargs = calls[0]
    assert name == "livecodebench/code_generation_lite"
    assert kwargs["version_tag"] == "release_v6" and kwargs["trust_remote_code"] is True and kwargs["split"] == "test"


@needs_data
def test_prompts():
    ex = _stdin_example()
    sys_msg, user = ex.messages
    assert sys_msg["role"] == "system" and user["role"] == "user"
    assert user["content"].startswith("### Question:\nThere are three cards")
    assert "standard input" in user["content"] and "```python\n# YOUR CODE HERE\n```" in user["content"]
    assert ex.reference["testtype"] == "stdin" and len(ex.reference["tests"]) == 5
    fex = example_from_record(_functional_record())
    assert "class Solution:\n    def zigzagTraversal" in fex.messages[-1]["content"]
    assert "standard input" not in fex.messages[-1]["content"]
    assert fex.reference == {"tests": fex.reference["tests"], "testtype": "functional", "func_name": "zigzagTraversal"}
    no_system = LiveCodeBenchTask(LiveCodeBenchConfig(system_prompt=None))
    assert no_system.to_example(_functional_record(), "test").messages[0]["role"] == "user"


def test_extract_code():
    assert extract_code("```python\na = 1\n```\ntext\n```python\nb = 2\n```\n```\nplain\n```") == "b = 2\n"
    assert extract_code("no fences here") is None
    assert extract_code("```\nx = 3\n```") == "x = 3\n"
    assert extract_code("```Python3\nprint(1)```") == "print(1)"


def test_compare_stdout_edge_cases():
    assert compare_stdout("YES  \nNO\t\n", "YES\nNO\n")  # trailing spaces / tabs
    assert compare_stdout("\n\nYES\nNO\n\n\n", "YES\nNO")  # leading / trailing blank lines
    assert not compare_stdout("YES\n\nNO\n", "YES\nNO\n")  # an inner blank line counts
    assert compare_stdout("1.0\n", "1\n") and compare_stdout("1e3 2.50\n", "1000 2.5\n")
    assert compare_stdout("1   2\n", "1 2\n")  # numbers: whitespace-split tokens
    assert not compare_stdout("a   b\n", "a b\n")  # words: exact after strip
    assert not compare_stdout("0.30000001\n", "0.3\n")  # exact decimals, no tolerance
    assert not compare_stdout("yes\n", "YES\n")
    assert compare_stdout("YES\r\nNO\r\n", "YES\nNO\n")
    assert not compare_stdout("sNaN\n", "snan1\n")  # a raising comparison is a mismatch
    assert not compare_stdout("", "0\n") and compare_stdout("", "\n")
    assert compare_functional("[1, 2]", "[1.0, 2]") and not compare_functional("[1, 2]", "[2, 1]")
    assert compare_functional('{"a": 1}', '{"a": 1}') and not compare_functional("not json", "1")


# --------------------------------------------------------------------------- grading (sandbox)


@needs_data
def test_correct_solution_passes_all_real_tests():
    ex = _stdin_example()
    g = LiveCodeBenchTask().grade(ex, _resp(SHORT_SORT_OK))
    assert (g.reward, g.correct, g.score) == (1.0, True, 1.0), g.feedback
    assert g.answer is None and g.details["statuses"] == ["passed"] * 5 and g.details["n_tests"] == 5
    assert g.feedback == "All 5 tests passed."


@needs_data
def test_wrong_solution_gets_input_expected_actual():
    ex = _stdin_example()
    code = "t = int(input())\nfor _ in range(t):\n    input()\n    print('YES')\n"
    g = LiveCodeBenchTask().grade(ex, _resp(code))
    assert g.reward == 0.0 and not g.correct
    # tests = the public test, then the 4 private ones; all-YES passes the private tests whose answers are all YES
    assert g.details["statuses"] == ["wrong_answer", "passed", "passed", "wrong_answer", "passed"]
    assert g.score == pytest.approx(3 / 5)
    fb = g.feedback
    assert fb.startswith("Passed 3/5 tests.") and len(fb) <= 2000
    assert "Test 1: wrong answer." in fb and "Test 4: wrong answer." in fb
    assert "Input:\n5\ncab\nacb\ncba\nbac\nbca" in fb and "Expected output:\nNO\nYES\nYES\nYES\nNO" in fb
    assert "Input:\n6\nabc\nacb" in fb and "Expected output:\nYES\nYES\nYES\nNO\nNO\nYES" in fb
    assert "Your output:\nYES\nYES\nYES\nYES\nYES\nYES" in fb


@needs_data
def test_crash_gives_traceback_and_syntax_error_stops_early():
    ex = _stdin_example()
    g = LiveCodeBenchTask().grade(ex, _resp("t = int(input())\nprint(t // (t - t))\n"))
    assert g.score == 0.0 and g.details["statuses"] == ["runtime_error"] * 5
    assert "Test 1: runtime error." in g.feedback and "Traceback (most recent call last)" in g.feedback
    assert 'File "solution.py", line 2' in g.feedback and "ZeroDivisionError" in g.feedback
    g = LiveCodeBenchTask().grade(ex, _resp("def broken(:\n    pass\n"))
    assert g.details["statuses"] == ["compile_error"] + ["skipped"] * 4
    assert "does not compile" in g.feedback and "SyntaxError" in g.feedback and "4 tests were not run" in g.feedback


@needs_data
def test_infinite_loop_times_out():
    ex = _stdin_example()
    g = LiveCodeBenchTask(LiveCodeBenchConfig(timeout_s=1.0, stop_on_first_failure=True)).grade(ex, _resp("while True:\n    pass\n"))
    assert g.details["statuses"] == ["timeout"] + ["skipped"] * 4
    assert "Test 1: time limit exceeded (1 s)." in g.feedback and "Expected output:" in g.feedback
    assert g.reward == 0.0
    # the total budget caps the run when every test loops
    g = LiveCodeBenchTask(LiveCodeBenchConfig(timeout_s=1.0, total_timeout_s=1.5)).grade(ex, _resp("while True:\n    pass\n"))
    st = g.details["statuses"]
    assert st[0] == "timeout" and st[-1] == "skipped" and set(st) <= {"timeout", "skipped"}
    assert "total time budget exhausted" in g.feedback and g.details["wall_s"] < 6


def test_output_comparison_end_to_end():
    ex = example_from_record(_synthetic("num", "2025-03-01T00:00:00", 2))
    # trailing spaces, extra blank lines, and 100.0 for 100 all pass
    g = LiveCodeBenchTask().grade(ex, _resp("x = int(input())\nprint(f'\\n{float(x)}   \\n\\n\\n')\n"))
    assert g.correct, g.feedback
    g = LiveCodeBenchTask().grade(ex, _resp("x = int(input())\nprint(x)\nprint()\nprint(x)\n"))
    assert g.score == 0.0 and "Your output:\n" in g.feedback


@needs_data
def test_functional_record():
    task = LiveCodeBenchTask()
    ex = example_from_record(_functional_record())
    assert len(ex.reference["tests"]) == 3
    g = task.grade(ex, _resp(ZIGZAG_OK))
    assert g.correct and g.reward == 1.0 and g.score == 1.0, g.feedback
    # returning a tuple is fine (JSON round trip)
    g = task.grade(ex, _resp(ZIGZAG_OK.replace("return seq[::2]", "return tuple(seq[::2])")))
    assert g.correct, g.feedback
    # wrong: forgets to reverse odd rows
    wrong = ZIGZAG_OK.replace("row if i % 2 == 0 else row[::-1]", "row")
    g = task.grade(ex, _resp(wrong))
    assert g.details["statuses"] == ["wrong_answer", "wrong_answer", "passed"] and not g.correct
    assert g.score == pytest.approx(1 / 3)
    assert "Input:\n[[1, 2], [3, 4]]" in g.feedback and "Expected output:\n[1, 4]" in g.feedback
    assert "Your returned value:\n[1, 3]" in g.feedback
    # wrong method name → runtime error naming it
    g = task.grade(ex, _resp(ZIGZAG_OK.replace("def zigzagTraversal", "def zigzag")))
    assert g.score == 0.0 and "zigzagTraversal" in g.feedback and "AttributeError" in g.feedback
    # a non-JSON result is a wrong answer with a note
    g = task.grade(ex, _resp(ZIGZAG_OK.replace("return seq[::2]", "return set(seq[::2])")))
    assert g.score == 0.0 and "not JSON-serializable" in g.feedback


def test_no_code_block():
    ex = example_from_record(_synthetic("q", "2025-03-01T00:00:00", 1))
    g = LiveCodeBenchTask().grade(ex, "I don't know.")
    assert (g.reward, g.correct, g.score, g.answer) == (0.0, False, 0.0, None)
    assert "No code found" in g.feedback and g.details["has_code"] is False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
