"""The vLLM engine's teacher scores (prompt_logprobs) against the HF engine's (a plain forward), in a real Ray actor: the same
top-k ids and log-probs, the same sampled-token log-probs, weight reload in place; and a vLLM-backed
TeacherScorer actor producing the records an HF-backed one does."""

import importlib.util

import numpy as np
import pytest
import ray
import torch

from distil_ray.models import tiny_model_dir
from distil_ray.config import TeacherConfig
from distil_ray.engines import EngineOptions
from distil_ray.engines.hf import HFEngine
from distil_ray.engines.vllm import VLLMEngine
from distil_ray.records import Graded, Prompt, Rollout
from distil_ray.tasks.base import TaskExample
from distil_ray.teacher.scorer import TeacherScorer

# skipped only where vLLM is not installed at all: an installed vLLM that fails to import (e.g. a
# broken torchvision beside CPU torch) must fail these tests, not hide behind a skip
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]

K = 20


@pytest.fixture(scope="module")
def vllm_teacher(ray_cluster):
    options = EngineOptions(kv_cache_memory_bytes=64 << 20, max_logprobs=32)
    handle = ray.remote(VLLMEngine).options(num_cpus=0.5).remote(str(tiny_model_dir()), options)
    ray.get(handle.sequence_logprobs.remote([1, 2], [3]), timeout=240)
    return handle


@pytest.fixture(scope="module")
def hf_teacher():
    return HFEngine(str(tiny_model_dir()))


def random_pairs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (7, 30, 12, 1)]
    responses = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (9, 25, 0, 4)]
    return prompts, responses


def assert_scores_close(got, ref, atol=1e-4):
    for g, r in zip(got, ref):
        assert g.topk_ids.shape == r.topk_ids.shape
        # ids may only differ where two log-probs tie within tolerance
        np.testing.assert_allclose(g.topk_logprobs.numpy(), r.topk_logprobs.numpy(), atol=atol)
        mismatch = (g.topk_ids != r.topk_ids).numpy()
        assert mismatch.sum() <= 2, f"top-k ids differ at {mismatch.sum()} entries"
        np.testing.assert_allclose(g.token_logprobs.numpy(), r.token_logprobs.numpy(), atol=atol)


def test_topk_matches_hf(vllm_teacher, hf_teacher):
    prompts, responses = random_pairs()
    got = ray.get(vllm_teacher.score_topk.remote(prompts, responses, K))
    ref = hf_teacher.score_topk(prompts, responses, K)
    for g, resp in zip(got, responses):
        assert g.topk_ids.shape == (len(resp), K) and g.token_logprobs.shape == (len(resp),)
        # sorted descending, normalised over the whole vocabulary
        assert (g.topk_logprobs[:, :-1] >= g.topk_logprobs[:, 1:]).all()
        assert (g.topk_logprobs.exp().sum(-1) < 1).all()
    assert_scores_close(got, ref)


def test_k_above_max_logprobs_is_a_clear_error(vllm_teacher):
    with pytest.raises(Exception, match="max_logprobs"):
        ray.get(vllm_teacher.score_topk.remote([[1, 2]], [[3]], 40))


def test_load_weights_in_place(vllm_teacher, hf_teacher):
    prompts, responses = random_pairs(1)
    gen = torch.Generator().manual_seed(1)
    original = {n: p.detach().clone() for n, p in hf_teacher.model.named_parameters()}
    perturbed = {n: p + 0.05 * torch.randn(p.shape, generator=gen) for n, p in original.items()}
    before = ray.get(vllm_teacher.score_topk.remote(prompts, responses, K))
    ray.get(vllm_teacher.load_weights.remote(list(perturbed.items())))
    hf_teacher.load_weights(perturbed.items())
    try:
        after = ray.get(vllm_teacher.score_topk.remote(prompts, responses, K))
        assert (after[0].token_logprobs - before[0].token_logprobs).abs().max() > 1e-2
        assert_scores_close(after, hf_teacher.score_topk(prompts, responses, K))
    finally:
        hf_teacher.load_weights(original.items())
        ray.get(vllm_teacher.load_weights.remote(list(original.items())))


def test_vllm_scorer_actor_equals_hf_scorer(ray_cluster):
    hf = TeacherScorer(str(tiny_model_dir()), TeacherConfig(backend="hf", topk=8))
    tok = hf.tokenizer
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = Prompt(TaskExample("q", "toy", messages, {}), np.asarray(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False), np.int32))
    texts, rewards = ["The answer is 5.", "It is 6.", "Seven."], [1.0, 0.0, 0.0]
    group = []
    for i, (text, reward) in enumerate(zip(texts, rewards)):
        ids = np.asarray(tok(text)["input_ids"] + [tok.eos_token_id], np.int32)
        r = Rollout("q", i, ids, np.zeros(len(ids), np.float32), "stop", 0, text, prompt.prompt_ids)
        group.append(Graded.from_rollout(r, reward=reward, feedback="" if reward else "wrong"))
    actor = ray.remote(TeacherScorer).options(name="teacher-test", num_cpus=0.5).remote(
        str(tiny_model_dir()), TeacherConfig(backend="vllm", topk=8, kv_cache_memory_bytes=64 << 20)
    )
    # one ObjectRef per rollout, as top-level arguments: Ray resolves them before the call
    got = ray.get(actor.score_group.remote(ray.put(prompt), *[ray.put(g) for g in group]), timeout=240)
    ref = hf.score_group(prompt, group)
    assert ray.get(actor.last_teacher_contexts.remote()) == hf.last_teacher_contexts()
    for g, r in zip(got, ref):
        assert g.distill_mask == r.distill_mask and g.demonstration == r.demonstration
        np.testing.assert_allclose(g.teacher_topk_logprobs, r.teacher_topk_logprobs, atol=1e-4)
        np.testing.assert_allclose(g.teacher_token_logprobs, r.teacher_token_logprobs, atol=1e-4)
        assert (g.teacher_topk_ids != r.teacher_topk_ids).sum() <= 2
    # sample 0 is the only success and has no feedback: no signal, not scored
    assert [g.distill_mask for g in got] == [False, True, True]
    assert ray.get(actor.stats.remote())["scored"] == 2
    ray.kill(actor)


@ray.remote(num_cpus=0.5)
def _flat_and_dict_scores(model_dir, prompts, responses, k):
    """In a fresh actor process (vLLM pins torch threads for the rest of a process): the engine's
    flat read-out, and the same request read the slow way, one dict of Logprob objects per position."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = VLLMEngine(model_dir, EngineOptions(kv_cache_memory_bytes=64 << 20, max_logprobs=32))
    flat = engine.score_topk(prompts, responses, k)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompts, responses)], params,
                               use_tqdm=False)
    slow = []
    for p, r, out in zip(prompts, responses, outs):
        rows = out.prompt_logprobs[len(p):len(p) + len(r)]
        best = [sorted(row.items(), key=lambda kv: (kv[1].rank, -kv[1].logprob))[:k] for row in rows]
        slow.append(([[t for t, _ in b] for b in best], [[lp.logprob for _, lp in b] for b in best],
                     [row[t].logprob for row, t in zip(rows, r)]))
    return [(f.topk_ids.tolist(), f.topk_logprobs.tolist(), f.token_logprobs.tolist()) for f in flat], slow


def test_flat_logprobs_read_out_equals_the_per_position_dicts(ray_cluster):
    prompts, responses = random_pairs(3)
    keep = [i for i, r in enumerate(responses) if r]
    prompts, responses = [prompts[i] for i in keep], [responses[i] for i in keep]
    flat, slow = ray.get(_flat_and_dict_scores.remote(str(tiny_model_dir()), prompts, responses, K), timeout=240)
    for (f_ids, f_lp, f_tok), (s_ids, s_lp, s_tok) in zip(flat, slow):
        assert f_ids == s_ids
        np.testing.assert_array_equal(np.float32(f_lp), np.float32(s_lp))
        np.testing.assert_array_equal(np.float32(f_tok), np.float32(s_tok))
