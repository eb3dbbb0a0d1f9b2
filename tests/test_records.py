"""Records grow stage by stage without copying arrays, and travel through the object store."""

import numpy as np
import pytest
import ray

from distil_ray.records import Graded, Rollout, Scored


def make_rollout():
    return Rollout("p7", 2, np.arange(4, dtype=np.int32), np.full(4, -0.5, np.float32), "stop", 5, "abcd", np.arange(3, dtype=np.int32))


def test_each_stage_keeps_the_previous_fields_and_shares_arrays():
    r = make_rollout()
    g = Graded.from_rollout(r, reward=1.0, correct=True, score=1.0, feedback="ok")
    s = Scored.from_graded(
        g,
        teacher_topk_ids=np.zeros((4, 3), np.int32),
        teacher_topk_logprobs=np.full((4, 3), -1.0, np.float32),
        teacher_token_logprobs=np.full(4, -0.7, np.float32),
        distill_mask=True,
    )
    assert (s.prompt_uid, s.sample_index, s.policy_version, s.reward, s.feedback) == ("p7", 2, 5, 1.0, "ok")
    assert s.response_ids is r.response_ids  # shared, not copied
    with pytest.raises(TypeError):
        Graded.from_rollout(r, not_a_field=1)


def test_records_round_trip_the_object_store():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        g = Graded.from_rollout(make_rollout(), reward=0.0, feedback="wrong")
        back = ray.get(ray.put(g))
        assert isinstance(back, Graded) and back.feedback == "wrong"
        np.testing.assert_array_equal(back.response_ids, g.response_ids)
        assert not back.response_ids.flags.writeable  # read zero-copy from shared memory
    finally:
        ray.shutdown()


def test_a_prompt_without_its_reference_keeps_what_the_student_sees():
    from distil_ray.records import Prompt
    from distil_ray.tasks.base import TaskExample

    example = TaskExample("u1", "toy", [{"role": "user", "content": "q"}], {"tests": ["secret"]}, {"domain": "d"})
    prompt = Prompt(example, np.arange(3, dtype=np.int32))
    light = prompt.without_reference()
    assert light.reference == {} and prompt.reference == {"tests": ["secret"]}  # the original keeps it
    assert (light.uid, light.task, light.messages, light.meta) == (prompt.uid, prompt.task, prompt.messages, prompt.meta)
    assert light.prompt_ids is prompt.prompt_ids
