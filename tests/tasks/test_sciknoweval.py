"""SciKnowEval L3: the processed SDPO splits, the raw hub schema → same prompts and split, and
SDPO's <answer>-tag grading on real records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distil_ray.tasks import get_task
from distil_ray.tasks.base import DataFormatError
from distil_ray.tasks.sciknoweval import (
    DOMAINS,
    SYSTEM_PROMPT,
    SciKnowEvalConfig,
    SciKnowEvalTask,
    extract_answer,
    format_raw_record,
    select_raw_records,
    split_records,
)

from tests.shared_data import SHARED_DATA

DATA = SHARED_DATA
SKE = DATA / "sciknoweval"
RAW_SAMPLE = DATA / "samples" / "sciknoweval_hf_raw_L3.jsonl"

pytestmark = pytest.mark.skipif(
    not SKE.is_dir() or not RAW_SAMPLE.is_file(),
    reason=f"SciKnowEval data not found under {DATA} (the shared data folder beside the repository)",
)

SIZES = {"biology": (450, 50), "chemistry": (1890, 210), "material": (841, 94), "physics": (720, 80)}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def task() -> SciKnowEvalTask:
    return SciKnowEvalTask(SciKnowEvalConfig(data_dir=SKE))


@pytest.fixture(scope="module")
def chem_test(task):
    return SciKnowEvalTask(SciKnowEvalConfig(domains="chemistry", data_dir=SKE)).load("test")


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("domain", DOMAINS)
def test_sizes_per_domain_match_the_readme(domain):
    t = SciKnowEvalTask(SciKnowEvalConfig(domains=[domain], data_dir=SKE))
    train, test = t.load("train"), t.load("test")
    assert (len(train), len(test)) == SIZES[domain]
    assert {e.meta["domain"] for e in train + test} == {domain}
    assert len({e.uid for e in train + test}) == sum(SIZES[domain])  # uids unique across splits


def test_examples_carry_system_prompt_question_and_hidden_answer(task, chem_test):
    ex = chem_test[0]
    first = read(SKE / "chemistry" / "test.jsonl")[0]
    assert ex.uid == f"sciknoweval/chemistry/test/{first['idx']}"
    assert ex.messages == [{"role": "system", "content": first["system"]}, {"role": "user", "content": first["prompt"]}]
    assert ex.reference["answer"] == first["answer"]
    assert first["answer"] not in ex.messages[1]["content"].split("\n")[-1]  # prompt ends with the instruction
    assert first["system"] == SYSTEM_PROMPT  # the constant used for raw records is the files' one
    # biology has two-option questions: their option letters are A and B only
    bio = SciKnowEvalTask(SciKnowEvalConfig(domains="biology", data_dir=SKE)).load("train")
    assert {tuple(e.reference["options"]) for e in bio} == {("A", "B"), ("A", "B", "C", "D")}
    assert all(e.reference["answer"] in e.reference["options"] for e in bio)


def test_all_domains_load_together_in_domain_order(task):
    test = task.load("test")
    assert len(test) == sum(s[1] for s in SIZES.values())
    order = [e.meta["domain"] for e in test]
    assert order == sorted(order, key=DOMAINS.index)


@pytest.mark.parametrize("domain", DOMAINS)
def test_split_procedure_reproduces_the_files_rows_and_order(domain):
    train, test = read(SKE / domain / "train.jsonl"), read(SKE / domain / "test.jsonl")
    everything = sorted(train + test, key=lambda r: r["idx"])
    assert [r["idx"] for r in everything] == list(range(len(everything)))  # idx = position before the split
    parts = split_records(everything, test_size=0.1, seed=42)
    assert [r["idx"] for r in parts["train"]] == [r["idx"] for r in train]
    assert [r["idx"] for r in parts["test"]] == [r["idx"] for r in test]


def test_raw_records_render_exactly_like_the_processed_files():
    processed = {r["description"]: r for d in DOMAINS for s in ("train", "test") for r in read(SKE / d / f"{s}.jsonl")}
    raws = read(RAW_SAMPLE)
    matched = 0
    for raw in raws:
        rec = format_raw_record(raw)
        assert rec["description"] == raw["question"] + " The solution will be evaluated in a mcq environment."
        twin = processed.get(rec["description"])
        if twin is None:
            continue
        matched += 1
        for key in ("prompt", "system", "answer", "description", "kind", "dataset", "elo", "tests"):
            assert rec[key] == twin[key], key
    assert matched >= 3  # three of the four sample records are in the processed chemistry files


def test_raw_path_loading_filters_formats_and_splits(tmp_path):
    raws = read(RAW_SAMPLE)
    assert {r["domain"] for r in raws} == {"Chemistry"}
    noise = [
        dict(raws[0], details=dict(raws[0]["details"], level="L2")),  # wrong level
        dict(raws[0], type="open-ended-qa"),  # not an MCQ
        dict(raws[0], domain="Physics"),  # another domain
    ]
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in noise[:1] + raws + noise[1:]), encoding="utf-8")

    assert len(select_raw_records(read(path), "chemistry")) == 4
    t = SciKnowEvalTask(SciKnowEvalConfig(domains="chemistry", raw_path=path))
    train, test = t.load("train"), t.load("test")
    assert (len(train), len(test)) == (3, 1)  # 4 records, test_size=0.1 -> ceil(0.4) = 1 test row
    expected = split_records(list(range(4)), test_size=0.1, seed=42)
    assert [e.meta["idx"] for e in train] == expected["train"]
    assert [e.meta["idx"] for e in test] == expected["test"]
    ex = next(e for e in train + test if e.meta["idx"] == 0)
    assert ex.messages[1]["content"] == format_raw_record(raws[0])["prompt"]
    assert ex.reference == {"answer": "A", "options": ["A", "B", "C", "D"]}
    assert ex.meta["subtask"] == "retrosynthesis_mcq" and ex.meta["domain"] == "chemistry"
    # the other domain gets only its own record, which is too few to split
    assert len(select_raw_records(read(path), "physics")) == 1
    with pytest.raises(ValueError, match="cannot split 1 records with test_size=0.1"):
        SciKnowEvalTask(SciKnowEvalConfig(domains="physics", raw_path=path)).load("train")


# ---------------------------------------------------------------- grading


def wrong_letter(ex) -> str:
    return next(o for o in ex.reference["options"] if o != ex.reference["answer"])


def test_grading_correct_wrong_and_whitespace(task, chem_test):
    ex = chem_test[0]
    gold, bad = ex.reference["answer"], wrong_letter(ex)
    ok = task.grade(ex, f"<reasoning>\nThe ester is hydrolysed.\n</reasoning>\n<answer>\n{gold}\n</answer>")
    assert (ok.reward, ok.correct, ok.score, ok.answer) == (1.0, True, 1.0, gold)
    assert "correct" in ok.feedback and "incorrect" not in ok.feedback

    wrong = task.grade(ex, f"<reasoning>...</reasoning>\n<answer>{bad}</answer>")
    assert (wrong.reward, wrong.correct, wrong.answer) == (0.0, False, bad)
    assert f"Your answer {bad} is incorrect" in wrong.feedback and gold not in wrong.feedback.replace(bad, "")

    spaced = task.grade(ex, f"<answer>  \n\t {gold}  \n </answer>\n")
    assert spaced.correct and spaced.answer == gold
    # the letter must be the whole answer: a restated option is wrong
    restated = task.grade(ex, f"<answer>{gold}: some molecule</answer>")
    assert not restated.correct and "not an option letter" in restated.feedback
    lower = task.grade(ex, f"<answer>{gold.lower()}</answer>")
    assert not lower.correct  # exact match, as in SDPO


def test_grading_last_answer_tag_wins(task, chem_test):
    ex = chem_test[0]
    gold, bad = ex.reference["answer"], wrong_letter(ex)
    assert task.grade(ex, f"<answer>{bad}</answer> on reflection <answer>{gold}</answer>").correct
    late_wrong = task.grade(ex, f"<answer>{gold}</answer> hmm, no: <answer>{bad}</answer>")
    assert not late_wrong.correct and late_wrong.answer == bad


def test_grading_missing_or_broken_tags(task, chem_test):
    ex = chem_test[0]
    gold, bad = ex.reference["answer"], wrong_letter(ex)
    none = task.grade(ex, f"I believe the answer is {gold}.")
    assert not none.correct and none.reward == 0.0
    assert "No <answer> tag" in none.feedback and none.details["has_answer_tag"] is False
    # SDPO's split-based extraction: a bare letter without tags counts (strict_tags turns this off)
    assert task.grade(ex, f"  {gold}\n").correct
    strict = SciKnowEvalTask(SciKnowEvalConfig(domains="chemistry", data_dir=SKE, strict_tags=True))
    bare = strict.grade(ex, gold)
    assert not bare.correct and bare.answer is None
    # an unclosed last tag still yields the text after it
    unclosed = task.grade(ex, f"<answer>\n{gold}\n")
    assert unclosed.correct and unclosed.details["has_closing_tag"] is False
    unclosed_wrong = task.grade(ex, f"<answer>{bad}")
    assert not unclosed_wrong.correct and "not closed" in unclosed_wrong.feedback
    empty = task.grade(ex, "<answer>   </answer>")
    assert not empty.correct and empty.answer is None and "empty" in empty.feedback


def test_reveal_answer_and_two_option_feedback():
    t = SciKnowEvalTask(SciKnowEvalConfig(domains="biology", data_dir=SKE, reveal_answer=True))
    two = next(e for e in t.load("test") if e.reference["options"] == ["A", "B"])
    bad = wrong_letter(two)
    gr = t.grade(two, f"<answer>{bad}</answer>")
    assert not gr.correct and gr.feedback.endswith(f"The correct answer is {two.reference['answer']}.")
    junk = t.grade(two, "<answer>E</answer>")
    assert "one of A, B" in junk.feedback


def test_extract_answer_semantics():
    assert extract_answer("x <answer> A </answer> y <answer>B</answer> z") == "B"
    assert extract_answer("no tags") == "no tags"
    assert extract_answer("no tags", strict_tags=True) is None
    assert extract_answer("<answer>C</answer> trailing </answer>") == "C"


# ---------------------------------------------------------------- errors


def test_malformed_line_names_file_and_line(tmp_path):
    good = read(SKE / "chemistry" / "test.jsonl")[0]
    (tmp_path / "chemistry").mkdir()
    path = tmp_path / "chemistry" / "test.jsonl"
    other = dict(good, idx=f"{good['idx']}-other")
    path.write_text(json.dumps(good) + "\n" + json.dumps(other) + "\n" + '{"prompt": "broken' + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as err:
        SciKnowEvalTask(SciKnowEvalConfig(domains="chemistry", data_dir=tmp_path)).load("test")
    assert err.value.line == 3 and f"{path}:3:" in str(err.value)

    # two records with one idx would share a uid: one graded against the other's answer
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, answer="A" if good["answer"] != "A" else "B")) + "\n",
                    encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"test\.jsonl:2: idx {good['idx']!r} is already used on line 1"):
        SciKnowEvalTask(SciKnowEvalConfig(domains="chemistry", data_dir=tmp_path)).load("test")
    # an answer no option carries could never be graded correct
    for bad in ("Z", good["answer"].lower()):
        path.write_text(json.dumps(dict(good, answer=bad)) + "\n", encoding="utf-8")
        with pytest.raises(DataFormatError, match=rf"test\.jsonl:1: answer '{bad}' is not one of the options A, B"):
            SciKnowEvalTask(SciKnowEvalConfig(domains="chemistry", data_dir=tmp_path)).load("test")
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataFormatError, match="no records"):
        SciKnowEvalTask(SciKnowEvalConfig(domains="chemistry", data_dir=tmp_path)).load("test")

    path.write_text(json.dumps({k: v for k, v in good.items() if k != "answer"}) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"test\.jsonl:1: missing field\(s\) answer"):
        SciKnowEvalTask(SciKnowEvalConfig(domains="chemistry", data_dir=tmp_path)).load("test")

    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r":1: expected a JSON object"):
        SciKnowEvalTask(SciKnowEvalConfig(domains="chemistry", data_dir=tmp_path)).load("test")


def test_bad_domain_and_split_list_the_valid_ones():
    with pytest.raises(ValueError, match="^domains='geology': unknown SciKnowEval domain 'geology'; valid domains: biology, chemistry, material, physics"):
        SciKnowEvalConfig(domains="geology", data_dir=SKE)
    with pytest.raises(ValueError, match="^data_dir, raw_path: .* not both"):
        SciKnowEvalConfig(data_dir=SKE, raw_path=RAW_SAMPLE)
    with pytest.raises(ValueError, match="valid splits: train, test"):
        SciKnowEvalTask(SciKnowEvalConfig(domains="physics", data_dir=SKE)).load("validation")
    # the hub's capitalised domain names are accepted too
    assert SciKnowEvalTask(SciKnowEvalConfig(domains="Physics", data_dir=SKE)).domains == ["physics"]


def test_registry_builds_the_task_and_lists_valid_names():
    t = get_task("sciknoweval", domains=["material"], data_dir=str(SKE))
    assert isinstance(t, SciKnowEvalTask) and len(t.load("test")) == 94
    with pytest.raises(ValueError, match="unknown task 'nope'; valid tasks: .*math.*sciknoweval"):
        get_task("nope")
