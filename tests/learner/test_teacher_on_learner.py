"""``teacher.backend=learner``: the teacher's forward on the learner rank itself (one process, a real
gloo group, real FSDP2), against an engine teacher and a float64 forward.

The records of ``learner_data.make_records`` carry the HF engine's teacher scores of the starting
model on their teacher context; here the same records, stripped of those scores, are scored by
the learner instead.
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from distil_ray.config import AlgorithmConfig, LearnerConfig, TeacherConfig
from distil_ray.engines.hf import score_topk
from distil_ray.learner.worker import LearnerWorker, Rendezvous
from distil_ray.models import load_tiny, tiny_model_dir

from .learner_data import make_records
from .test_worker import STEP, free_port

K = 8
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def setup():
    path = tiny_model_dir()
    model, tok = load_tiny(path)
    return path, model, make_records(model, tok, n_prompts=4, samples=3, k=K, seed=5)


def unscored(records):
    """What the teacher actor hands the learner with backend=learner: contexts, no scores."""
    return [dataclasses.replace(r, teacher_topk_ids=np.zeros((len(r.response_ids), 0), np.int32),
                                teacher_topk_logprobs=np.zeros((len(r.response_ids), 0), np.float32),
                                teacher_token_logprobs=np.zeros(0, np.float32)) if r.distill_mask else r
            for r in records]


def new_worker(path, *, update="current", ema_rate=None, **learner):
    cfg = LearnerConfig(lr=STEP["lr"], adam_eps=STEP["eps"], weight_decay=STEP["weight_decay"],
                        grad_clip=STEP["grad_clip"], world_size=1, micro_batch_size=2, **learner)
    teacher = None if update is None else TeacherConfig(backend="learner", topk=K, update=update,
                                                        ema_rate=ema_rate or 0.05)
    return LearnerWorker(str(path), cfg, AlgorithmConfig("distil", {"baseline": "group"}),
                         Rendezvous(0, 1, "127.0.0.1", free_port()), ema_rate=ema_rate, teacher=teacher)


def assert_same_scores(got, want, atol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.distill_mask == w.distill_mask
        if not w.distill_mask:
            continue
        assert g.teacher_topk_ids.shape == w.teacher_topk_ids.shape == (len(w.response_ids), K)
        np.testing.assert_allclose(g.teacher_topk_logprobs, w.teacher_topk_logprobs, rtol=0, atol=atol)
        np.testing.assert_allclose(g.teacher_token_logprobs, w.teacher_token_logprobs, rtol=0, atol=atol)
        # ids may only differ where two log-probs tie within the tolerance
        assert (g.teacher_topk_ids != w.teacher_topk_ids).sum() <= 2


def float64_logprobs(model, prompt, response, ids):
    """log π(ids | teacher context, response_<t) from a plain float64 forward."""
    seq = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = copy.deepcopy(model).double().eval()(seq).logits[0]
    logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
    return logp.gather(-1, torch.as_tensor(ids, dtype=torch.long)).numpy(), \
        logp.gather(-1, torch.tensor(response)[:, None])[:, 0].numpy()


@pytest.mark.parametrize("learner", [{}, {"packed_sequences": True, "max_tokens_per_micro_batch": 40}],
                         ids=["padded", "packed-budget"])
def test_the_learner_scores_what_the_engine_teacher_scored_and_any_given_ids(setup, learner):
    path, model, records = setup
    worker = new_worker(path, **learner)
    try:
        scored = worker.score_teacher(unscored(records))
        assert_same_scores(scored, records)
        # at given ids (here random ones, as a student's top-k would be): log π_T at exactly those
        rng = np.random.default_rng(0)
        at_ids = [rng.integers(0, model.config.vocab_size, (len(r.response_ids), 5)) for r in records]
        given = worker.score_teacher(unscored(records), at_ids=at_ids)
    finally:
        worker.close()
    for r, g, ids in zip(records, given, at_ids):
        if not r.distill_mask:
            assert g is not None and g.teacher_topk_ids.shape == r.teacher_topk_ids.shape  # left as it came
            continue
        want, want_token = float64_logprobs(model, r.teacher_prompt_ids.tolist(), r.response_ids.tolist(), ids)
        np.testing.assert_array_equal(g.teacher_topk_ids, ids)
        np.testing.assert_allclose(g.teacher_topk_logprobs, want, rtol=0, atol=2e-5)
        np.testing.assert_allclose(g.teacher_token_logprobs, want_token, rtol=0, atol=2e-5)


def test_a_step_with_the_teacher_on_the_learner_is_the_step_on_engine_scores(setup):
    path, _, records = setup
    worker = new_worker(path)
    try:
        m_learner = worker.train_step(unscored(records))
        after_learner = worker.state_dict_numpy()
    finally:
        worker.close()
    worker = new_worker(path, update=None)  # the engine teacher's scores, precomputed
    try:
        m_engine = worker.train_step(records)
        after_engine = worker.state_dict_numpy()
    finally:
        worker.close()
    assert m_learner["loss"] == pytest.approx(m_engine["loss"], rel=1e-5)
    assert m_learner["num_tokens"] == m_engine["num_tokens"] > 0
    for k in after_engine:
        np.testing.assert_allclose(after_learner[k], after_engine[k], rtol=0, atol=1e-6, err_msg=k)


def test_ema_and_fixed_teachers_score_with_their_own_weights_and_leave_the_policy_alone(setup, tmp_path):
    path, model, records = setup
    # EMA: the average after two steps, loaded into a plain model, scores what the learner scores
    worker = new_worker(path, update="ema", ema_rate=0.5)
    try:
        for _ in range(2):
            worker.train_step(unscored(records))
            worker.advance_ema()
        policy = worker.state_dict_numpy()
        scored = worker.score_teacher(unscored(records))
        assert all(np.array_equal(v, policy[k]) for k, v in worker.state_dict_numpy().items())  # swapped back exactly
        ema = worker.weights("float32", "ema").arrays
    finally:
        worker.close()
    assert max(np.abs(ema[k] - policy[k]).max() for k in ema) > 1e-4  # the average is not the policy
    average, _ = load_tiny(path)
    average.load_state_dict({k: torch.from_numpy(v) for k, v in ema.items()}, strict=False)
    assert_same_scores(scored, _engine_scores(average, records))

    # fixed: after training and a checkpoint round trip, still the starting model's scores
    worker = new_worker(path, update="fixed")
    try:
        for _ in range(2):
            worker.train_step(unscored(records))
        worker.save_checkpoint(str(tmp_path / "ckpt"), {})
        worker.train_step(unscored(records))
        worker.load_checkpoint(str(tmp_path / "ckpt"))
        policy = worker.state_dict_numpy()
        scored = worker.score_teacher(unscored(records))
    finally:
        worker.close()
    start = {k: v.numpy() for k, v in model.state_dict().items()}
    assert max(np.abs(start[k] - policy[k]).max() for k in policy) > 1e-4  # the policy moved
    assert_same_scores(scored, records)  # make_records scored them with the starting model


def _engine_scores(model, records):
    signal = [r for r in records if r.distill_mask]
    with torch.no_grad():
        scores = iter(score_topk(model.eval(), [r.teacher_prompt_ids.tolist() for r in signal],
                                 [r.response_ids.tolist() for r in signal], K))
    out = []
    for r in records:
        if not r.distill_mask:
            out.append(r)
            continue
        s = next(scores)
        out.append(dataclasses.replace(r, teacher_topk_ids=s.topk_ids.numpy().astype(np.int32),
                                       teacher_topk_logprobs=s.topk_logprobs.numpy(),
                                       teacher_token_logprobs=s.token_logprobs.numpy()))
    return out


def test_records_without_a_context_are_refused(setup):
    path, _, records = setup
    bare = [dataclasses.replace(r, teacher_prompt_ids=np.zeros(0, np.int32)) for r in unscored(records)]
    worker = new_worker(path)
    try:
        with pytest.raises(ValueError, match="teacher_prompt_ids"):
            worker.score_teacher(bare)
    finally:
        worker.close()


def float64_full_logprobs(model, prompt, response, temperature=1.0):
    """log softmax(logits / T) at each response position, from a plain float64 forward."""
    seq = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = copy.deepcopy(model).double().eval()(seq).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1:-1] / temperature, -1)


def test_student_support_scores_the_teacher_at_the_policys_own_top_k(setup):
    """teacher.support=student (SDPO): the ids are the student's top-k on its own prompt, the
    teacher's log-probs are taken at exactly those ids on its context."""
    path, model, records = setup
    cfg = LearnerConfig(world_size=1, micro_batch_size=2)
    teacher = TeacherConfig(backend="learner", topk=K, support="student")
    worker = LearnerWorker(str(path), cfg, AlgorithmConfig("sdpo"), Rendezvous(0, 1, "127.0.0.1", free_port()),
                           teacher=teacher, temperature=1.0)
    try:
        ids = worker.student_topk_ids(unscored(records))
        scored = worker.score_teacher(unscored(records), at_ids=ids)
        metrics = worker.train_step(unscored(records))
    finally:
        worker.close()
    for r, own, s in zip(records, ids, scored):
        if not r.distill_mask:
            assert own.shape == (len(r.response_ids), 0)
            continue
        student = float64_full_logprobs(model, r.prompt_ids.tolist(), r.response_ids.tolist())
        top = student.topk(K, -1)
        # ids may only differ where two log-probs tie within float32 rounding
        assert (own != top.indices.numpy()).sum() <= 2
        np.testing.assert_array_equal(s.teacher_topk_ids, own)
        want, _ = float64_logprobs(model, r.teacher_prompt_ids.tolist(), r.response_ids.tolist(), own)
        np.testing.assert_allclose(s.teacher_topk_logprobs, want, rtol=0, atol=2e-5)
    assert np.isfinite(metrics["loss"]) and metrics["sdpo/num_tokens"] > 0


def test_teacher_temperature_scales_the_teachers_logits(setup):
    path, model, records = setup
    cfg = LearnerConfig(world_size=1, micro_batch_size=2)
    worker = LearnerWorker(str(path), cfg, AlgorithmConfig("opsd"), Rendezvous(0, 1, "127.0.0.1", free_port()),
                           teacher=TeacherConfig(backend="learner", topk=K, temperature=1.1))
    try:
        scored = worker.score_teacher(unscored(records))
    finally:
        worker.close()
    r, s = next((r, s) for r, s in zip(records, scored) if r.distill_mask)
    want = float64_full_logprobs(model, r.teacher_prompt_ids.tolist(), r.response_ids.tolist(), temperature=1.1)
    np.testing.assert_allclose(s.teacher_topk_logprobs, want.gather(-1, torch.as_tensor(s.teacher_topk_ids).long()),
                               rtol=0, atol=2e-5)
    at_one = float64_full_logprobs(model, r.teacher_prompt_ids.tolist(), r.response_ids.tolist())
    assert not np.allclose(s.teacher_topk_logprobs, at_one.gather(-1, torch.as_tensor(s.teacher_topk_ids).long()),
                           atol=1e-3)  # a real difference, not rounding


@pytest.mark.parametrize("setting,message", [({"support": "student"}, "teacher.support=student"),
                                             ({"temperature": 1.1}, "teacher.temperature=1.1")])
def test_what_only_the_learner_teacher_can_do_is_refused_elsewhere(setting, message):
    from distil_ray.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        TeacherConfig(backend="vllm", **setting).check()
    TeacherConfig(backend="learner", **setting).check()
    TeacherConfig(backend="vllm", temperature=1.0).check()
