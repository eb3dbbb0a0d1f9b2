"""Each baseline's protocol on fixed real records: the student prompt, the extracted code, the grade,
the feedback and the teacher context that `+experiment=<task> algorithm=<baseline>` produces equal
what the reference's rules give. The expected strings are written out from reading the references
(lasgroup/SDPO at 0e6d510, siyan-zhao/OPSD at 590ec26), not computed by the code under test."""

import json

import pytest

from distil_ray.config import compose_config
from distil_ray.feedback.code import compare_stdout
from distil_ray.feedback.templates import RepromptConfig, reference_solution_context, reprompt_group
from distil_ray.models import load_tiny, tiny_model_dir
from distil_ray.tasks import get_task
from distil_ray.tasks.livecodebench.prompts import build_prompt, extract_code
from distil_ray.tasks.prompts import to_prompts
from tests.shared_data import SHARED_DATA

SAMPLES = SHARED_DATA / "samples"
LCB_RECORDS = SAMPLES / "livecodebench_records.jsonl"

# SDPO data/format/prompts.py:3 (CODE_PROMPT), as Python evaluates the literal
SDPO_CODE_PROMPT = (
    "You are a coding expert. You will be given a coding problem, and you need to write a correct Python "
    "program that matches the specification and passes all tests. The time limit is 1 second. You may start "
    "by outlining your thought process. In the end, please provide the complete code in a code block "
    "enclosed with ``` ```.\n\n"
)
# SDPO verl/trainer/config/actor/actor.yaml:131-149 (block scalars |-: no trailing newline)
SDPO_SOLUTION = "\nCorrect solution:\n\n{}"
SDPO_FEEDBACK = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{}"
SDPO_REPROMPT_TAIL = "\n\nCorrectly solve the original question."

SHORT_SORT = "t = int(input())\nfor _ in range(t):\n    s = input().strip()\n    print('YES' if sum(a != b for a, b in zip(s, 'abc')) <= 2 else 'NO')\n"


def reprompt_config(cfg) -> RepromptConfig:
    rc = cfg.teacher.reprompt  # the composed config holds the dataclass itself
    assert isinstance(rc, RepromptConfig)
    return rc


def lines(path, n):
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


# ------------------------------------------------------------------------------------------------
# LiveCodeBench x SDPO (and SDPO's GRPO baseline: the task settings are the experiment's)


@pytest.fixture(scope="module")
def lcb():
    if not LCB_RECORDS.is_file():
        pytest.skip(f"data not found: {LCB_RECORDS}")
    cfg = compose_config(["+experiment=lcb", "algorithm=sdpo", f"task.kwargs.source={LCB_RECORDS}",
                          "task.kwargs.start_date=2023-08-01", "task.kwargs.end_date=2024-01-01"])
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    (record,) = [r for r in lines(LCB_RECORDS, 1)]
    return cfg, task, record


def test_lcb_student_prompt_is_sdpos(lcb):
    cfg, task, record = lcb
    (ex,) = task.load("test")
    # data/format/code.py:27 CODE_PROMPT.format(problem=question_content); no system message
    assert ex.messages == [{"role": "user", "content": SDPO_CODE_PROMPT + record["question_content"]}]
    # functional problems: the method's signature (data/utils/livecodebench.py:15-16, :45-46)
    starter = "class Solution:\n    def zigzagTraversal(self, grid: List[List[int]]) -> List[int]:\n        "
    assert build_prompt("Q.", starter, None, "sdpo") == [{"role": "user", "content": SDPO_CODE_PROMPT + (
        "Q.\n\nYour solution should have the following signature: ```python\n"
        "def zigzagTraversal(self, grid: List[List[int]]) -> List[int]:\n```")}]
    assert cfg.model.enable_thinking is False  # user.yaml apply_chat_template_kwargs


def test_lcb_tests_are_the_private_ones(lcb):
    _, task, _ = lcb
    private = json.loads((SAMPLES / "livecodebench_1873_A_private_tests_decoded.json").read_text())
    (test,) = task.load("test")
    assert [t["input"] for t in test.reference["tests"]] == [t["input"] for t in private]  # not the public one
    (train,) = task.load("train")
    assert len(train.reference["tests"]) == max(1, int(len(private) * 0.5))  # split_tests.py:17


def test_lcb_extracts_the_longest_block_of_any_language(lcb):
    _, task, _ = lcb
    response = "Idea:\n```python\nprint(1)\n```\nFull program:\n```\n" + SHORT_SORT + "```\nDone."
    assert extract_code(response, task.cfg.extraction) == SHORT_SORT  # code.py extract_code: max(len)
    assert extract_code(response) == "print(1)\n"  # the default: the last python block


def test_lcb_grade_and_feedback(lcb):
    _, task, _ = lcb
    (ex,) = task.load("test")
    right = task.grade(ex, "```\n" + SHORT_SORT + "```")
    assert right.reward == 1.0 and right.feedback == ""  # format_test_feedback: "" when nothing fails
    wrong = task.grade(ex, "```python\nt = int(input())\nfor _ in range(t):\n    input()\n    print('YES')\n```")
    assert wrong.reward == 0.0 and wrong.feedback and "NO" in wrong.feedback
    # run_test_std: outputs compared as one line (newlines -> spaces), as strings
    joined = "t = int(input())\nprint(' '.join('YES' if sum(a != b for a, b in zip(input().strip(), 'abc')) <= 2 else 'NO' for _ in range(t)))\n"
    assert task.grade(ex, "```\n" + joined + "```").reward == 1.0
    assert compare_stdout("1.0\n", "1\n", "exact") is False and compare_stdout("1.0\n", "1\n") is True
    assert compare_stdout("YES NO", "YES\nNO\n", "exact") and not compare_stdout("YES NO", "YES\nNO\n")
    assert compare_stdout("3", "3 -\n", "exact")  # a trailing '-' of the expected output is dropped


def test_lcb_teacher_context_and_masking(lcb):
    cfg, task, _ = lcb
    (ex,) = task.load("train")
    prompt = ex.messages[-1]["content"]
    rc = reprompt_config(cfg)
    ok, bad = "```\n" + SHORT_SORT + "```", "```\nprint('YES')\n```"
    grades = [task.grade(ex, r) for r in (ok, bad)]
    assert grades[0].feedback == "" and grades[1].feedback
    ctx = reprompt_group(ex.messages, [ok, bad], [g.reward for g in grades], [g.feedback for g in grades], rc)
    # the lone success: not its own demonstration, no feedback -> no teacher context, masked
    assert ctx[0].messages is None
    # the failure: the sibling's solution, its own feedback left out (feedback_only_without_solution)
    assert ctx[1].messages == [{"role": "user", "content": prompt + SDPO_SOLUTION.format(ok) + SDPO_REPROMPT_TAIL}]
    ctx = reprompt_group(ex.messages, [bad], [0.0], [grades[1].feedback], rc)
    assert ctx[0].messages == [{"role": "user", "content": prompt + SDPO_FEEDBACK.format(grades[1].feedback) + SDPO_REPROMPT_TAIL}]


# ------------------------------------------------------------------------------------------------
# SciKnowEval x SDPO


def test_sciknoweval_protocol():
    data = SHARED_DATA / "sciknoweval"
    if not data.is_dir():
        pytest.skip(f"data not found: {data}")
    cfg = compose_config(["+experiment=sciknoweval", "algorithm=sdpo", f"task.kwargs.data_dir={data}",
                          "task.kwargs.domains=[biology]"])
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    record = lines(data / "biology" / "test.jsonl", 1)[0]
    ex = next(e for e in task.load("test") if e.messages[-1]["content"] == record["prompt"])
    # data/format/sciknoweval.py:27-31: the processed file's system prompt and prompt, as they are
    assert ex.messages == [{"role": "system", "content": record["system"]}, {"role": "user", "content": record["prompt"]}]
    gold = record["answer"]
    other = next(c for c in "ABCD" if c != gold)
    # feedback/mcq.py: split("<answer>")[-1].split("</answer>")[0].strip() == answer
    assert task.grade(ex, f"<reasoning>r</reasoning>\n<answer>\n{gold}\n</answer>").reward == 1.0
    assert task.grade(ex, f"<answer>{other}</answer> then <answer> {gold} </answer>").reward == 1.0
    assert task.grade(ex, gold).reward == 1.0  # no tag: the whole response is the answer
    assert task.grade(ex, f"<answer>{gold.lower()}</answer>").reward == 0.0
    assert cfg.teacher.reprompt.include_environment_feedback is False  # run_sdpo_all.sh: no feedback
    rc = reprompt_config(cfg)
    good = f"<think>scratch</think>\n<answer>{gold}</answer>"
    ctx = reprompt_group(ex.messages, [good, "<answer>Z</answer>"], [1.0, 0.0], ["", ""], rc)
    assert ctx[0].messages is None  # a lone success has no demonstration
    # the system message stays; the demonstration loses its think block (remove_thinking_from_demonstration)
    assert ctx[1].messages == [
        {"role": "system", "content": record["system"]},
        {"role": "user", "content": record["prompt"] + SDPO_SOLUTION.format(f"<answer>{gold}</answer>") + SDPO_REPROMPT_TAIL},
    ]


# ------------------------------------------------------------------------------------------------
# math x OPSD

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def test_math_protocol():
    data = SHARED_DATA / "math"
    if not data.is_dir():
        pytest.skip(f"data not found: {data}")
    cfg = compose_config(["+experiment=math", "algorithm=opsd", f"task.kwargs.data_dir={data}",
                          "task.kwargs.train=[minerva_math]", "task.kwargs.test=[aime24]"])
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    record = lines(data / "minerva_math" / "test.jsonl", 1)[0]
    problem = record.get("problem") or record["question"]
    train = task.load("train")[0]
    # data_collator.py:52: the training student's turn
    assert train.messages == [{"role": "user", "content": f"Problem: {problem}\n\n{INSTRUCTION}"}]
    # evaluate_math.py:340-342: the evaluation prompt, no prefix
    aime = lines(data / "aime24" / "test.jsonl", 1)[0]
    test = next(e for e in task.load("test") if e.reference["problem"] == (aime.get("problem") or aime.get("question")))
    assert test.messages == [{"role": "user", "content": f"{test.reference['problem']}\n\n{INSTRUCTION}"}]
    # data_collator.py:82-87: the teacher restates the bare problem, then the reference solution
    ctx = reference_solution_context(train.messages, train.reference["solution"], problem=train.reference["problem"])
    assert ctx.messages == [{"role": "user", "content": (
        f"{problem}\n\nHere is a reference solution to this problem:\n{train.reference['solution']}\n\n\n"
        "After understanding the reference solution and the rationale behind each step, now articulate your "
        "own step-by-step reasoning that derives the same final answer to the problem below:\n\n" + INSTRUCTION)}]
    assert ctx.messages[0]["content"].count(INSTRUCTION) == 1
    # opsd_trainer.py:856-859, :975-990: the student's prompt is the template's text without its
    # special tokens, tokenised again; evaluation prompts keep them
    assert cfg.model.train_prompt_special_tokens is False
    _, tok = load_tiny(tiny_model_dir())
    (plain,) = to_prompts([train], tok, special_tokens=False)
    (full,) = to_prompts([train], tok)
    text = tok.apply_chat_template(train.messages, add_generation_prompt=True, tokenize=False)
    special = [t for t in tok.all_special_tokens if t in text]
    assert special  # the template does use special tokens
    stripped = text
    for t in special:
        stripped = stripped.replace(t, "")
    assert tok.decode(plain.prompt_ids) == stripped and not set(plain.prompt_ids) & set(tok.all_special_ids)
    assert tok.decode(full.prompt_ids) == text
    assert task.grade(test, f"so \\boxed{{{test.reference['answer']}}}").reward == 1.0
