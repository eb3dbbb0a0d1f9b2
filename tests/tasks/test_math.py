r"""Math task: \boxed{} extraction, loaders for every local schema, math-verify grading on real
records, and the wall-clock guard around math-verify (thread and process isolation)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import distil_ray.tasks.math.verify as math_verify
from distil_ray.tasks import get_task
from distil_ray.tasks.base import DataFormatError
from distil_ray.tasks.math import (
    INSTRUCTION,
    MathConfig,
    MathTask,
    answers_match,
    extract_boxed,
    last_boxed,
    normalize_answer,
    normalize_record,
)

from tests.shared_data import SHARED_DATA

DATA = SHARED_DATA
MATH = DATA / "math"
SAMPLES = DATA / "samples"

pytestmark = pytest.mark.skipif(
    not MATH.is_dir() or not SAMPLES.is_dir(),
    reason=f"math data not found under {DATA} (the shared data folder beside the repository)",
)


@pytest.fixture(scope="module")
def task() -> MathTask:
    return MathTask(MathConfig(data_dir=MATH))


@pytest.fixture(scope="module")
def by_uid(task):
    return {e.uid: e for source in ("aime24", "amc23", "minerva_math") for e in task.load(source)}


# ---------------------------------------------------------------- extraction


def test_extraction_matches_nested_braces_and_takes_the_last_box():
    assert last_boxed(r"so $\boxed{\frac{1}{\sqrt{2}}}$.") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\boxed{x^{2^{3}}+\left\{1\right\}}") == r"x^{2^{3}}+\left\{1\right\}"
    assert last_boxed(r"first \boxed{3}, then \boxed{4}, finally \boxed{5}") == "5"
    assert last_boxed(r"\boxed{1} and \fbox{2}") == "2"
    assert last_boxed(r"\fbox{7} then \boxed{8}") == "8"
    assert last_boxed(r"escaped braces: \boxed{\{1,2\}}") == r"\{1,2\}"
    assert last_boxed(r"\boxed 42 is it") == "42"
    assert extract_boxed(r"\boxed{a}\boxed{b{c}}") == ["a", "b{c}"]


def test_extraction_without_a_complete_box():
    assert last_boxed("The answer is 12.") is None
    assert last_boxed(r"\boxed{3} ... truncated \boxed{4") == "3"  # the unclosed box is skipped
    assert last_boxed(r"\boxed{") is None
    assert last_boxed(r"\boxedx{5}") is None  # a different command


def test_normalize_answer():
    assert normalize_answer(r"\dfrac{1}{2}.") == r"\frac{1}{2}"
    assert normalize_answer(r"\left( 1, 2 \right)") == "(1,2)"
    assert normalize_answer(r"45^\circ") == normalize_answer(r"45^{\circ}") == "45"
    assert normalize_answer(r"\text{Monday}") == "Monday"
    assert normalize_answer(r"$1\,000$") == "1000"
    assert normalize_answer("025") == "25" and normalize_answer("27.0") == "27" and normalize_answer("-0") == "0"
    assert normalize_answer(r"\boxed{7}") == "7"
    assert normalize_answer(r"\tfrac{3}{4}\!") == r"\frac{3}{4}"


# ---------------------------------------------------------------- loaders


def test_local_sets_load_with_their_own_field_names(task, by_uid):
    aime, amc, minerva = task.load("aime24"), task.load("amc23"), task.load("minerva_math")
    assert (len(aime), len(amc), len(minerva)) == (30, 40, 272)
    assert len(task.load("test")) == 342

    first = by_uid["math/aime24/60"]  # problem / solution (worked) / answer "204"
    assert first.reference["answer"] == "204" and "solution" in first.reference
    assert first.messages == [{"role": "user", "content": first.messages[0]["content"]}]
    assert first.messages[0]["content"].startswith("Every morning Aya goes for a $9$-kilometer-long walk")
    assert first.messages[0]["content"].endswith("\n" + INSTRUCTION)
    assert "204" not in first.messages[0]["content"]
    assert any(e.reference["answer"] == "025" for e in aime)  # leading zeros are kept in the reference

    amc0 = by_uid["math/amc23/0"]  # float 27.0, no solution; the bare problem for OPSD's teacher
    assert amc0.reference == {"answer": "27", "problem": amc0.messages[0]["content"][: -len("\n" + INSTRUCTION)]}
    m0 = by_uid["math/minerva_math/0"]  # answer only inside the solution's \boxed{}
    assert m0.reference["answer"] == "1.6" and r"\boxed{1.6}" in m0.reference["solution"]
    assert m0.meta["source"] == "minerva_math" and m0.meta["type"].startswith("Introduction to Astronomy")
    assert by_uid["math/minerva_math/1"].reference["answer"] == "4.5e33"


@pytest.mark.parametrize(
    "name, answer, has_solution",
    [("aime25_matharena_record.jsonl", "70", False), ("hmmt_feb_2025_record.jsonl", "103", False),
     ("aime24_math-ai_record.jsonl", "204", False)],
)
def test_sample_hub_schemas(name, answer, has_solution):
    t = MathTask(MathConfig(files={"sample": SAMPLES / name}, test=["sample"]))
    (ex,) = t.load("test")
    assert ex.reference["answer"] == answer
    assert ("solution" in ex.reference) == has_solution  # math-ai's solution is only "\boxed{204}"
    assert ex.uid.startswith("math/sample/")
    assert t.grade(ex, rf"... so the answer is $\boxed{{{answer}}}$.").correct


def test_normalize_record_schemas_and_errors():
    assert normalize_record({"problem_idx": 1, "problem": "p", "answer": 70})["answer"] == "70"
    assert normalize_record({"question": "q", "answer": 3.5})["answer"] == "3.5"
    rec = normalize_record({"problem": "p", "solution": r"work \boxed{\frac{1}{2}} done"})
    assert rec["answer"] == r"\frac{1}{2}" and rec["solution"].startswith("work")
    with pytest.raises(ValueError, match="no 'problem' or 'question'"):
        normalize_record({"answer": "1"})
    with pytest.raises(ValueError, match="no 'answer' field"):
        normalize_record({"problem": "p", "solution": "no box here"})


def test_bad_lines_and_records_name_file_and_line(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"problem": "1+1?", "answer": "2"}\n\n{"problem": "2+2?"}\n', encoding="utf-8")
    t = MathTask(MathConfig(files={"mine": path}))
    with pytest.raises(DataFormatError, match=rf"{path}:3: no 'answer' field"):
        t.load("mine")
    path.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": \n', encoding="utf-8")
    with pytest.raises(DataFormatError) as err:
        t.load("mine")
    assert err.value.line == 2 and str(path) in str(err.value)


def test_unknown_sources_and_splits_list_the_valid_ones(task):
    with pytest.raises(ValueError, match=r"^test=\['aime99'\]: unknown math source 'aime99' in test; valid sources: .*aime24.*aime25.*hmmt25"):
        MathConfig(test=["aime99"])
    with pytest.raises(ValueError, match="unknown math split 'dev'; valid: 'train', 'test' or a source"):
        task.load("dev")
    # hub names are configurable per source (the hub is not reached here)
    hub = {"aime25": "someone/aime25", "mine": {"name": "someone/mine", "split": "train"}}
    t = MathTask(MathConfig(hub=hub, test=["mine"]))
    assert t.hub["aime25"].name == "someone/aime25" and t.hub["mine"].split == "train"
    assert MathTask().hub["hmmt25"].name == "MathArena/hmmt_feb_2025"


def test_registry_builds_the_math_task():
    t = get_task("math", data_dir=MATH, test=["amc23"])
    assert isinstance(t, MathTask) and len(t.load("test")) == 40


# ---------------------------------------------------------------- grading on real records


@pytest.mark.parametrize(
    "uid, response, correct",
    [
        ("math/aime24/60", r"Thus the walk takes $\boxed{204}$ minutes.", True),
        ("math/aime24/60", r"The answer is \boxed{204 \text{ minutes}}.", True),
        ("math/aime24/60", r"Answer: \boxed{\text{204}}", True),
        ("math/aime24/60", r"\boxed{203}", False),
        ("math/aime24/60", r"I first got \boxed{203}, but rechecking: \boxed{204}", True),
        ("math/aime24/60", r"I first got \boxed{204}, but rechecking: \boxed{203}", False),
        ("math/amc23/0", r"They meet $\boxed{27}$ miles from $A$.", True),
        ("math/amc23/0", r"\boxed{27.0}", True),
        ("math/amc23/0", r"\boxed{x = 27}", True),
        ("math/amc23/0", r"\boxed{18}", False),
        ("math/minerva_math/0", r"s = \alpha f = \boxed{1.6 \mathrm{~cm}}", True),
        ("math/minerva_math/0", r"\boxed{1.7}", False),
        ("math/minerva_math/1", r"L \simeq \boxed{4.5 \times 10^{33}} \mathrm{erg/s}", True),
        ("math/minerva_math/1", r"\boxed{4.5e33}", True),
        ("math/minerva_math/1", r"\boxed{4.6 \times 10^{33}}", False),
        ("math/minerva_math/102", r"\boxed{\dfrac{\pi}{2}}", True),
        ("math/minerva_math/102", r"\boxed{\pi/2}", True),
        ("math/minerva_math/102", r"\boxed{\frac{\pi}{3}}", False),
        ("math/minerva_math/67", r"\boxed{1 + i\sqrt{3}}", True),
        ("math/minerva_math/137", r"\boxed{\frac{\sqrt{2}}{2} c}", True),
    ],
)
def test_grading_real_records(task, by_uid, uid, response, correct):
    gr = task.grade(by_uid[uid], response)
    assert gr.correct is correct and gr.reward == gr.score == float(correct)
    assert ("is correct" in gr.feedback) is correct
    assert last_boxed(response).strip() in gr.feedback  # the feedback quotes the extracted answer


def test_leading_zero_reference_and_majority_keys(task):
    ex = next(e for e in task.load("aime24") if e.reference["answer"] == "025")
    a, b = task.grade(ex, r"\boxed{25}"), task.grade(ex, r"\boxed{025}")
    assert a.correct and b.correct and a.answer == b.answer == "25"  # same key for maj@k


@pytest.mark.parametrize(
    "gold, pred, correct",
    [
        (r"\frac{1}{2}", "0.5", True),
        (r"\frac{1}{2}", r"\dfrac{1}{2}", True),
        (r"\frac{1}{2}", r"\dfrac12", True),
        (r"2\sqrt{3}", r"\sqrt{12}", True),
        (r"2\sqrt{3}", r"3\sqrt{2}", False),
        ("0.5", r"\frac{1}{3}", False),
    ],
)
def test_equivalent_forms(gold, pred, correct):
    t = MathTask(MathConfig(data_dir=MATH))
    ex = t.to_example({"problem": "Compute it.", "answer": gold}, "custom", "test", index=0)
    gr = t.grade(ex, rf"Therefore the result is $\boxed{{{pred}}}$.")
    assert gr.correct is correct


def test_missing_box_and_revealed_answer(task, by_uid):
    ex = by_uid["math/aime24/60"]
    gr = task.grade(ex, "The answer is 204.")
    assert not gr.correct and gr.answer is None and r"\boxed{}" in gr.feedback
    assert "204" not in gr.feedback  # the reference is not leaked by default
    revealing = MathTask(MathConfig(data_dir=MATH, reveal_answer=True))
    assert revealing.grade(ex, r"\boxed{5}").feedback.endswith("The correct answer is 204.")


def test_grading_from_worker_threads_uses_math_verify(task, by_uid):
    # math-verify's own signal-based timeouts would fail outside the main thread
    ex = by_uid["math/minerva_math/102"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        grades = list(pool.map(lambda r: task.grade(ex, r), [r"\boxed{\pi/2}", r"\boxed{1.5707963}", r"\boxed{3}"]))
    assert [g.correct for g in grades] == [True, True, False]
    assert all(g.details["method"] == "math_verify" and not g.details["timed_out"] for g in grades)
    thread_task = MathTask(MathConfig(data_dir=MATH, isolation="thread"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert all(pool.map(lambda r: thread_task.grade(ex, r).correct, [r"\boxed{\pi/2}", r"\boxed{1.5707963}"]))


# ---------------------------------------------------------------- the time limit


def test_thread_guard_abandons_and_stops_a_slow_verify(monkeypatch, by_uid):
    ticks = []

    def slow_verify(gold, pred):
        for _ in range(1000):  # ~10 s unless interrupted
            ticks.append(1)
            time.sleep(0.01)
        return True

    monkeypatch.setattr(math_verify, "math_verify_equal", slow_verify)
    t = MathTask(MathConfig(data_dir=MATH, isolation="thread", timeout_s=0.3))
    start = time.monotonic()
    gr = t.grade(by_uid["math/aime24/60"], r"\boxed{\frac{408}{2}}")
    assert time.monotonic() - start < 2.0
    assert not gr.correct and gr.details["timed_out"] and gr.details["math_verify"] is None
    assert "incorrect" in gr.feedback
    # the abandoned helper thread is stopped, not left running
    time.sleep(0.2)
    seen = len(ticks)
    time.sleep(0.2)
    assert len(ticks) == seen < 1000
    assert not any(th.name == "math-verify" and th.is_alive() for th in threading.enumerate())
    # a string-equal answer never needs math-verify, so the slow verify cannot hurt it
    assert t.grade(by_uid["math/aime24/60"], r"\boxed{204}").correct


def test_process_guard_kills_a_pathological_expression_and_recovers(by_uid):
    t = MathTask(MathConfig(data_dir=MATH, isolation="process", timeout_s=1.0))
    ex = by_uid["math/aime24/60"]
    t.grade(ex, r"\boxed{\frac{408}{2}}")  # start the helper process outside the timed part
    verifier = math_verify._get_process_verifier()
    restarts = verifier.restarts
    start = time.monotonic()
    gr = t.grade(ex, r"\boxed{9^{9^{9^{9}}}}")  # sympy evaluates the tower inside C big-int code
    assert time.monotonic() - start < 5.0
    assert not gr.correct and gr.details["timed_out"]
    assert verifier.restarts == restarts + 1
    ok = t.grade(ex, r"\boxed{\frac{408}{2}}")  # a fresh helper process takes over
    assert ok.correct and ok.details["method"] == "math_verify"


def test_answers_match_details_and_bad_isolation():
    ok, details = answers_match("204", "204")
    assert ok and details["method"] == "string"
    with pytest.raises(ValueError, match="isolation must be"):
        answers_match("1", "2", isolation="fork")
    with pytest.raises(ValueError, match="^isolation='signal': allowed values are 'process', 'thread'"):
        MathConfig(isolation="signal")


def test_reference_solutions_grade_correct_against_their_own_answers(task):
    """Real records, real AoPS/Minerva write-ups: every reference solution that boxes its final answer
    grades as correct against the record's answer (AIME24's answers carry leading zeros, and one is
    boxed as ``\\textbf{(073)}``)."""
    for source in ("aime24", "minerva_math"):
        graded = [
            task.grade(ex, ex.reference["solution"])
            for ex in task.load(source)
            if ex.reference.get("solution") and "boxed" in ex.reference["solution"]
        ]
        assert len(graded) >= 25 and all(g.correct for g in graded), source
