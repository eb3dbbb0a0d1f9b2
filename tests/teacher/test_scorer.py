"""TeacherScorer with the HF backend, in process: the teacher sequence ends with the student's exact
response ids, records without signal are masked and unscored, the demonstration is a successful
sibling (never the sample itself), scores equal a direct forward on the teacher sequence."""

import numpy as np
import pytest

from distil_ray.feedback.templates import RepromptConfig, reprompt_group
from distil_ray.models import load_tiny, tiny_model_dir
from distil_ray.config import TeacherConfig
from distil_ray.engines.hf import score_topk
from distil_ray.records import Graded, Prompt, Rollout
from distil_ray.tasks.base import TaskExample
from distil_ray.teacher.scorer import TeacherScorer

K = 5
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def scorer():
    return TeacherScorer(str(tiny_model_dir()), TeacherConfig(backend="hf", topk=K))


@pytest.fixture(scope="module")
def tok():
    return load_tiny(tiny_model_dir())[1]


def make_prompt(tok, reference=None):
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    return Prompt(TaskExample("q1", "toy", MESSAGES, reference or {}), np.asarray(ids, np.int32))


def graded(tok, i, text, reward, feedback=""):
    # Response ids that re-tokenising the text would NOT reproduce (one arbitrary id per byte,
    # then the end-of-turn token), so the test notices any re-tokenising.
    ids = np.asarray([3 + b % 200 for b in text.encode()] + [tok.eos_token_id], np.int32)
    r = Rollout("q1", i, ids, np.zeros(len(ids), np.float32), "stop", 0, text, np.zeros(3, np.int32))
    return Graded.from_rollout(r, reward=reward, correct=reward > 0.5, feedback=feedback)


def test_reprompt_group_contexts_masks_and_demonstrations(scorer, tok):
    prompt = make_prompt(tok)
    group = [
        graded(tok, 0, "<think>hmm</think>The answer is 5.", 1.0),
        graded(tok, 1, "It is 6.", 0.0, feedback="Incorrect: the answer is 5."),
        graded(tok, 2, "Seven.", 0.0, feedback=""),
        graded(tok, 3, "5", 1.0),
    ]
    before = scorer.stats()
    out = scorer.score_group(prompt, group)
    contexts = scorer.last_teacher_contexts()
    assert [s.sample_index for s in out] == [0, 1, 2, 3]
    # every rollout has a successful sibling here: 0 learns from 3, the others from 0 (thinking stripped)
    assert [s.demonstration for s in out] == ["5", "The answer is 5.", "The answer is 5.", "The answer is 5."]
    assert all(s.distill_mask for s in out)
    for s, ctx in zip(out, contexts):
        T = len(s.response_ids)
        assert ctx[-T:] == s.response_ids.tolist()
        assert s.teacher_topk_ids.shape == (T, K) and s.teacher_topk_ids.dtype == np.int32
        assert s.teacher_topk_logprobs.shape == (T, K) and s.teacher_topk_logprobs.dtype == np.float32
        assert s.teacher_token_logprobs.shape == (T,)
        # the teacher prompt is the chat-templated reprompt, ending with the assistant opening
        prompt_part = tok.decode(ctx[:-T])
        assert "Correct solution" in prompt_part and prompt_part.endswith("<|im_start|>assistant\n")
        # equal to a direct forward on exactly that sequence
        (ref,) = score_topk(scorer.engine.model, [ctx[:-T]], [ctx[-T:]], K)
        np.testing.assert_array_equal(s.teacher_topk_ids, ref.topk_ids.numpy())
        np.testing.assert_allclose(s.teacher_topk_logprobs, ref.topk_logprobs.numpy(), atol=1e-6)
        np.testing.assert_allclose(s.teacher_token_logprobs, ref.token_logprobs.numpy(), atol=1e-6)
    # the group may also come record by record (how a driver passes one ObjectRef per rollout)
    again = scorer.score_group(prompt, *group)
    assert all(np.array_equal(a.teacher_topk_ids, b.teacher_topk_ids) for a, b in zip(again, out))
    stats = scorer.stats()
    assert stats["scored"] - before["scored"] == 8 and stats["used_solution"] - before["used_solution"] == 8


def test_without_successes_feedback_only_and_no_signal(scorer, tok):
    prompt = make_prompt(tok)
    group = [graded(tok, 0, "It is 6.", 0.0, feedback="Incorrect: the answer is 5."), graded(tok, 1, "Seven.", 0.0)]
    before = scorer.stats()
    with_fb, no_signal = scorer.score_group(prompt, group)
    contexts = scorer.last_teacher_contexts()
    assert with_fb.distill_mask and with_fb.demonstration is None
    assert "feedback from your unsuccessful earlier attempt" in tok.decode(contexts[0])
    assert not no_signal.distill_mask and contexts[1] is None and no_signal.demonstration is None
    T = len(no_signal.response_ids)
    assert no_signal.teacher_topk_ids.shape == (T, K) and not no_signal.teacher_topk_ids.any()
    assert no_signal.teacher_token_logprobs.shape == (T,) and not no_signal.teacher_token_logprobs.any()
    stats = scorer.stats()
    assert stats["no_signal"] - before["no_signal"] == 1 and stats["used_feedback"] - before["used_feedback"] == 1
    assert stats["scored"] - before["scored"] == 1  # the no-signal record was not sent to the backend


def test_a_lone_success_is_never_its_own_demonstration(scorer, tok):
    out = scorer.score_group(make_prompt(tok), [graded(tok, 0, "5", 1.0), graded(tok, 1, "6", 0.0)])
    assert out[0].demonstration is None and not out[0].distill_mask  # no other success, no feedback
    assert out[1].demonstration == "5" and out[1].distill_mask
    ctx = reprompt_group(MESSAGES, ["5", "6"], [1.0, 0.0], [None, None], RepromptConfig())
    assert [c.has_signal for c in ctx] == [s.distill_mask for s in out]


def test_reference_solution_context(tok):
    scorer = TeacherScorer(str(tiny_model_dir()), TeacherConfig(backend="hf", topk=3, context="reference_solution"))
    group = [graded(tok, 0, "6", 0.0)]
    (s,) = scorer.score_group(make_prompt(tok, {"solution": "2 + 3 = 5"}), group)
    assert s.distill_mask and s.demonstration is None
    assert "reference solution" in tok.decode(scorer.last_teacher_contexts()[0]) and "2 + 3 = 5" in tok.decode(scorer.last_teacher_contexts()[0])
    (s,) = scorer.score_group(make_prompt(tok), group)  # no solution in the task: no signal
    assert not s.distill_mask and scorer.last_teacher_contexts() == [None]


def test_update_weights_and_errors(scorer, tok):
    prompt_ids, response = [1, 5, 6, 7], [8, 9, 10]
    head = scorer.engine.model.lm_head.weight.detach().clone()
    try:
        assert scorer.update_weights({"lm_head.weight": np.zeros(tuple(head.shape), np.float32)}, 4) >= 0
        assert scorer.version() == 4
        np.testing.assert_allclose(scorer.sequence_logprobs(prompt_ids, response), [-np.log(head.shape[0])] * 3, atol=1e-5)
    finally:
        scorer.update_weights({"lm_head.weight": head.numpy()}, 5)
    with pytest.raises(ValueError, match=r"teacher\.backend.*'vllm', 'hf', 'http'"):
        TeacherScorer(str(tiny_model_dir()), TeacherConfig(backend="grpc"))
    with pytest.raises(ValueError, match=r"teacher\.context.*'reprompt', 'reference_solution'"):
        TeacherScorer(str(tiny_model_dir()), TeacherConfig(backend="hf", context="oracle"))
    other = graded(tok, 0, "x", 1.0)
    other.prompt_uid = "q2"
    with pytest.raises(ValueError, match="q2"):
        scorer.score_group(make_prompt(tok), [other])


def test_a_fixed_teacher_stays_and_the_others_load_what_they_are_sent():
    """update="fixed": the initial weights whatever is synced; "ema" and "current" load the weights a
    sync sends (the policy, or the learners' moving average of it) and score with them."""
    import torch

    from distil_ray.engines.hf import forward_logprobs
    from distil_ray.models import load_tiny, tiny_model_dir
    from distil_ray.teacher.scorer import TeacherScorer

    path = str(tiny_model_dir())
    base, _ = load_tiny(path)
    start = {k: v.detach().numpy().copy() for k, v in base.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    sent = {k: v + 0.05 * torch.randn(v.shape, generator=gen).numpy() for k, v in start.items()}
    ema = TeacherScorer(path, TeacherConfig(backend="hf", update="ema"))
    fixed = TeacherScorer(path, TeacherConfig(backend="hf", update="fixed"))
    ema.update_weights(sent, 3)
    fixed.update_weights(sent, 3)
    reference, _ = load_tiny(path)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in sent.items()})
    prompt, response = [3, 4, 5, 6], [7, 8, 9]
    np.testing.assert_allclose(ema.sequence_logprobs(prompt, response), forward_logprobs(reference, prompt, response), atol=1e-5)
    assert ema.version() == 3
    for k, v in fixed.engine.model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), start[k])
    assert fixed.version() == 0
    with pytest.raises(ValueError, match="teacher.update"):
        TeacherScorer(path, TeacherConfig(backend="hf", update="slow"))


def test_the_teachers_engine_limit_bounds_what_is_scored(tok):
    """A context + response longer than the engine's max_model_len is not sent (no signal, counted)."""
    scorer = TeacherScorer(str(tiny_model_dir()), TeacherConfig(backend="hf", topk=3, max_model_len=30))
    assert scorer.max_context_tokens == 29  # vLLM keeps room for the one token a request generates
    long = graded(tok, 1, "x" * 40, 0.0, feedback="wrong")
    (s,) = scorer.score_group(make_prompt(tok), [long])
    assert not s.distill_mask and scorer.stats()["too_long"] == 1
