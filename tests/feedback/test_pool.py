"""FeedbackPool on a real local Ray cluster: named grader actors, results equal to in-process
grading, streaming in completion order, code executed in the sandbox inside the actors."""

import json

import numpy as np
import pytest
import ray

from distil_ray.config import FeedbackConfig, TaskConfig
from distil_ray.feedback.pool import FeedbackPool, Grader
from distil_ray.records import Graded, Rollout
from distil_ray.tasks import get_task
from distil_ray.tasks.livecodebench import example_from_record
from tests.shared_data import SHARED_DATA

pytestmark = pytest.mark.timeout(180)

LCB_RECORDS = SHARED_DATA / "samples" / "livecodebench_records.jsonl"
SKE = SHARED_DATA / "sciknoweval"

SHORT_SORT_OK = """
t = int(input())
for _ in range(t):
    s = input().strip()
    print("YES" if sum(a != b for a, b in zip(s, "abc")) != 3 else "NO")
"""
LOOPS_FOREVER = "while True:\n    pass\n"


def rollout(text: str, index: int = 0) -> Rollout:
    ids = np.arange(5, dtype=np.int32)
    return Rollout("p0", index, ids, np.zeros(5, np.float32), "stop", policy_version=3, text=text, prompt_ids=np.arange(3, dtype=np.int32))


def code(body: str) -> str:
    return f"```python\n{body.strip()}\n```"


def test_grader_without_ray_fills_the_graded_record():
    task = get_task("sciknoweval", data_dir=SKE, domains=["chemistry"])
    example = task.load("test")[0]
    answer = example.reference["answer"]
    graded = Grader(TaskConfig("sciknoweval", {"data_dir": str(SKE), "domains": ["chemistry"]})).grade(
        example, rollout(f"<answer>{answer}</answer>")
    )
    assert isinstance(graded, Graded) and graded.correct and graded.reward == 1.0
    assert graded.policy_version == 3 and graded.response_ids is not None and graded.answer == answer


def test_pool_matches_in_process_grading_and_actors_are_named(ray_cluster):
    task_kwargs = {"data_dir": str(SKE), "domains": ["physics"]}
    examples = get_task("sciknoweval", **task_kwargs).load("test")[:6]
    rollouts = [rollout(f"<answer>{letter}</answer>", i) for i, letter in enumerate("ABCDAB")]
    pool = FeedbackPool(TaskConfig("sciknoweval", task_kwargs), FeedbackConfig(num_workers=2, num_cpus=0.5),
                        name="feedback-ske")
    try:
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        assert {"feedback-ske-0", "feedback-ske-1"} <= names
        pooled = pool.grade_all(zip(examples, rollouts))
        local = Grader(TaskConfig("sciknoweval", task_kwargs))
        expected = [local.grade(e, r) for e, r in zip(examples, rollouts)]
        assert [(g.reward, g.correct, g.feedback, g.answer, g.sample_index) for g in pooled] == [
            (g.reward, g.correct, g.feedback, g.answer, g.sample_index) for g in expected
        ]
        assert 0 < sum(g.correct for g in pooled) < len(pooled)  # the example has both outcomes
    finally:
        pool.shutdown()


def test_slow_program_does_not_hold_up_the_others(ray_cluster):
    record = json.loads(LCB_RECORDS.read_text().splitlines()[0])
    example_ref = ray.put(example_from_record(record, "test"))  # one copy shared by every sample
    task = TaskConfig("livecodebench", {"timeout_s": 3.0, "stop_on_first_failure": True})
    pool = FeedbackPool(task, FeedbackConfig(num_workers=2), name="feedback-lcb")
    try:
        pool.submit(example_ref, rollout(code(LOOPS_FOREVER), 0))
        for i in range(1, 4):
            pool.submit(example_ref, rollout(code(SHORT_SORT_OK), i))
        results = list(pool.as_completed())
        order = [g.sample_index for g in results]
        assert sorted(order) == [0, 1, 2, 3]
        assert order[-1] == 0, f"the timed-out program should finish last, got {order}"
        results = {g.sample_index: g for g in results}
        assert results[0].reward == 0.0 and "time" in results[0].feedback.lower()
        assert all(results[i].correct and results[i].score == 1.0 for i in (1, 2, 3))
    finally:
        pool.shutdown()


def test_bad_pool_size_names_the_key():
    with pytest.raises(ValueError, match="feedback.num_workers"):
        FeedbackPool(TaskConfig("sciknoweval"), FeedbackConfig(num_workers=0))
