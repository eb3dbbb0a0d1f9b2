"""The TeacherActor batches: groups sent while the engine is busy are scored together in one
engine call, and each caller gets exactly what scoring its group alone gives."""

import numpy as np
import pytest
import ray

from distil_ray.config import TeacherConfig
from distil_ray.models import tiny_model_dir
from distil_ray.teacher.actor import TeacherActor
from distil_ray.teacher.scorer import TeacherScorer

from .test_scorer import graded, make_prompt

pytestmark = pytest.mark.timeout(300)


def _groups(tok, n):
    groups = []
    for g in range(n):
        prompt = make_prompt(tok)
        group = [graded(tok, i, f"answer {g}-{i}", 0.0, feedback=f"wrong: {g}") for i in range(3)]
        groups.append((prompt, group))
    return groups


def test_queued_groups_are_scored_together_and_each_caller_gets_its_own(ray_cluster):
    path = str(tiny_model_dir())
    cfg = TeacherConfig(backend="hf", topk=4, update="fixed")
    alone = TeacherScorer(path, cfg)
    tok = alone.tokenizer
    groups = _groups(tok, 12)
    actor = ray.remote(num_cpus=0.5)(TeacherActor).remote(path, cfg)
    refs = [actor.score_group.remote(prompt, *group) for prompt, group in groups]  # all in flight at once
    results = ray.get(refs)
    for (prompt, group), scored in zip(groups, results):
        expected = alone.score_group(prompt, group)
        assert [s.sample_index for s in scored] == [g.sample_index for g in group]
        for s, e in zip(scored, expected):
            np.testing.assert_array_equal(s.teacher_topk_ids, e.teacher_topk_ids)
            np.testing.assert_allclose(s.teacher_topk_logprobs, e.teacher_topk_logprobs, rtol=0, atol=1e-5)
            assert s.distill_mask == e.distill_mask
    stats = ray.get(actor.stats.remote())
    assert stats["scored"] == 12 * 3
    assert stats["engine_calls"] < 12 and stats["groups_per_call"] > 1  # batched, not one call per group


def test_one_bad_group_fails_alone(ray_cluster):
    """A group the engine cannot score (a token id outside the vocabulary) fails its own caller;
    the groups batched with it are scored all the same, and a mislabelled group is refused at once."""
    path = str(tiny_model_dir())
    actor = ray.remote(num_cpus=0.5)(TeacherActor).remote(path, TeacherConfig(backend="hf", topk=4, update="fixed"))
    tok = ray.get(actor.__ray_call__.remote(lambda self: self.scorer.tokenizer))
    groups = _groups(tok, 3)
    bad_prompt, bad_group = groups[1]
    bad_group[0].response_ids = bad_group[0].response_ids.copy()
    bad_group[0].response_ids[0] = 10**6
    refs = [actor.score_group.remote(prompt, *group) for prompt, group in groups]
    assert len(ray.get(refs[0])) == 3 and len(ray.get(refs[2])) == 3
    with pytest.raises(ray.exceptions.RayTaskError):
        ray.get(refs[1])
    other = graded(tok, 0, "x", 0.0, feedback="f")
    other.prompt_uid = "elsewhere"
    with pytest.raises(ray.exceptions.RayTaskError, match="elsewhere"):
        ray.get(actor.score_group.remote(groups[0][0], other))
    assert len(ray.get(actor.score_group.remote(*groups[0]))) == 3  # the actor carries on
