"""``teacher.backend=learner`` against the vLLM teacher, on real Ray actors: the same graded groups
scored by a vLLM TeacherScorer actor, and by two FSDP2 learner ranks from the contexts a
learner-backed TeacherScorer builds, give the same top-k ids and log-probs (float32, 1e-4)."""

import importlib.util

import numpy as np
import pytest
import ray

from distil_ray.config import AlgorithmConfig, LearnerConfig, TeacherConfig
from distil_ray.learner.group import LearnerGroup
from distil_ray.models import tiny_model_dir
from distil_ray.records import Graded, Prompt, Rollout
from distil_ray.tasks.base import TaskExample
from distil_ray.teacher.scorer import TeacherScorer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(400),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]

K = 20


def graded_groups(tok):
    """Two prompts' groups: feedback on the failures, a successful sibling for the second group."""
    groups = []
    for q, (question, texts, rewards) in enumerate([
        ("What is 2 + 3?", ["The answer is 6.", "It is 7.", "Four."], [0.0, 0.0, 0.0]),
        ("Name a prime above 10.", ["11", "12 is prime.", "Maybe 15, or 21, or 27, or 33."], [1.0, 0.0, 0.0]),
    ]):
        messages = [{"role": "user", "content": question}]
        ids = np.asarray(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False), np.int32)
        prompt = Prompt(TaskExample(f"q{q}", "toy", messages, {}), ids)
        group = []
        for i, (text, reward) in enumerate(zip(texts, rewards)):
            response = np.asarray(tok(text)["input_ids"] + [tok.eos_token_id], np.int32)
            r = Rollout(f"q{q}", i, response, np.zeros(len(response), np.float32), "stop", 0, text, ids)
            group.append(Graded.from_rollout(r, reward=reward, correct=reward > 0,
                                             feedback="" if reward else f"wrong: {text!r} is not right"))
        groups.append((prompt, group))
    return groups


def test_the_learner_teacher_equals_the_vllm_teacher(ray_cluster):
    path = str(tiny_model_dir())
    contexts = TeacherScorer(path, TeacherConfig(backend="learner", topk=K))
    groups = graded_groups(contexts.tokenizer)
    to_score = [r for scored in contexts.score_groups(groups) for r in scored]
    assert sum(r.distill_mask for r in to_score) == 5  # the second group's success has no signal
    assert all(r.teacher_topk_ids.shape == (len(r.response_ids), 0) for r in to_score if r.distill_mask)

    vllm = ray.remote(TeacherScorer).options(num_cpus=0.5).remote(
        path, TeacherConfig(backend="vllm", topk=K, kv_cache_memory_bytes=64 << 20))
    try:
        want = [r for scored in ray.get(vllm.score_groups.remote(groups), timeout=300) for r in scored]
    finally:
        ray.kill(vllm)

    learner = LearnerGroup(path, LearnerConfig(world_size=2, num_cpus=0.5, micro_batch_size=2),
                           AlgorithmConfig("distil"), teacher=TeacherConfig(backend="learner", topk=K),
                           name="learner-teacher")
    try:
        got = learner.score_teacher(to_score)  # 3 records on one rank, 3 on the other: unequal forwards
    finally:
        learner.shutdown()
    for g, w in zip(got, want):
        assert g.distill_mask == w.distill_mask
        np.testing.assert_array_equal(g.teacher_prompt_ids, w.teacher_prompt_ids)  # the same context
        if not w.distill_mask:
            continue
        np.testing.assert_allclose(g.teacher_topk_logprobs, w.teacher_topk_logprobs, rtol=0, atol=1e-4)
        np.testing.assert_allclose(g.teacher_token_logprobs, w.teacher_token_logprobs, rtol=0, atol=1e-4)
        assert (g.teacher_topk_ids != w.teacher_topk_ids).sum() <= 2  # only where two log-probs tie
