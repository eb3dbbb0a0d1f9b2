"""HFEngine against the plain HF model: greedy tokens, tempered behaviour log-probs, stop strings,
EOS and finish reasons, n samples; RolloutWorker records on top of it (no Ray needed)."""

import numpy as np
import pytest
import torch

from distil_ray.models import load_tiny, tiny_model_dir
from distil_ray.config import RolloutConfig
from distil_ray.engines import SamplingConfig
from distil_ray.engines.base import sample_seed, stop_cut, strip_stop_text
from distil_ray.engines.hf import HFEngine
from distil_ray.records import Prompt
from distil_ray.rollout import RolloutWorker
from distil_ray.tasks.base import TaskExample

QUESTIONS = ["What is 2 + 3?", "Say hi.", "Name a colour.", "How many days are in a week?"]


@pytest.fixture(scope="module")
def engine():
    return HFEngine(str(tiny_model_dir()))


@pytest.fixture(scope="module")
def reference():
    model, tok = load_tiny(tiny_model_dir())
    return model, tok


@pytest.fixture(scope="module")
def prompts(reference):
    _, tok = reference
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False) for q in QUESTIONS]


def tempered_logprobs(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_greedy_equals_unbatched_hf_generate(engine, reference, prompts):
    model, tok = reference
    out = {(i, j): s for i, j, s in engine.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=10))}
    assert set(out) == {(i, 0) for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        # one prompt at a time, no padding: batching and left padding must not change the result
        ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, pad_token_id=tok.pad_token_id)
        ref = ref[0, len(prompt) :].tolist()
        assert out[(i, 0)].token_ids == ref
        assert out[(i, 0)].finish_reason == "length"
        # greedy reports the T=1 log-probs
        np.testing.assert_allclose(out[(i, 0)].logprobs, tempered_logprobs(model, prompt, ref, 1.0), atol=1e-5)


def test_sampled_logprobs_are_tempered_forward_logprobs(engine, reference, prompts):
    model, _ = reference
    cfg = SamplingConfig(n=3, temperature=0.7, max_new_tokens=8, seed=3)
    samples = list(engine.generate(prompts[:2], cfg))
    assert sorted((i, j) for i, j, _ in samples) == [(i, j) for i in range(2) for j in range(3)]
    for i, _, s in samples:
        assert len(s.logprobs) == len(s.token_ids) and 0 < len(s.token_ids) <= 8
        assert (s.finish_reason == "stop") == (len(s.token_ids) < 8)
        np.testing.assert_allclose(s.logprobs, tempered_logprobs(model, prompts[i], s.token_ids, 0.7), atol=1e-5)
    group = [s.token_ids for i, _, s in samples if i == 0]
    assert len({tuple(g) for g in group}) > 1, "the n samples of one prompt should differ"
    again = list(engine.generate(prompts[:2], cfg))
    assert [s.token_ids for *_, s in again] == [s.token_ids for *_, s in samples], "same seed, same samples"


def test_stop_string_cuts_after_the_completing_token(engine, reference, prompts):
    _, tok = reference
    (_, _, full), = engine.generate(prompts[:1], SamplingConfig(temperature=0, max_new_tokens=12))
    text = tok.decode(full.token_ids, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    (_, _, cut), = engine.generate(prompts[:1], SamplingConfig(temperature=0, max_new_tokens=12, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids and len(cut.token_ids) < len(full.token_ids)
    assert stop in tok.decode(cut.token_ids, skip_special_tokens=True)
    assert stop not in tok.decode(cut.token_ids[:-1], skip_special_tokens=True)
    assert len(cut.logprobs) == len(cut.token_ids)


def test_eos_ends_a_sample_and_is_kept(engine, reference, prompts):
    model, tok = reference
    (_, _, full), = engine.generate(prompts[:1], SamplingConfig(temperature=0, max_new_tokens=10))
    # make <|im_end|> the greedy choice wherever the 4th generated token would have been
    head = model.lm_head.weight.detach().clone()
    head[tok.eos_token_id] += 3 * head[full.token_ids[3]]
    engine.load_weights([("lm_head.weight", head)])
    try:
        (_, _, s), = engine.generate(prompts[:1], SamplingConfig(temperature=0, max_new_tokens=10))
        assert s.finish_reason == "stop"
        assert s.token_ids[-1] == tok.eos_token_id and tok.eos_token_id not in s.token_ids[:-1]
        assert len(s.logprobs) == len(s.token_ids) < 10
    finally:
        engine.load_weights([("lm_head.weight", model.lm_head.weight.detach())])


def test_load_weights_rejects_unknown_names(engine):
    with pytest.raises(ValueError, match="not_a_weight"):
        engine.load_weights([("not_a_weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([("lm_head.weight", torch.zeros(3, 3))])


def test_helpers():
    assert stop_cut([1, 2, 3, 4], lambda ids: "".join("abcd"[i - 1] for i in ids), ("bc",)) == 3
    assert stop_cut([1, 2], lambda ids: "ab", ("x",)) is None
    assert strip_stop_text("hello</a> tail", ("</a>", "l")) == "he"
    seeds = {sample_seed(0, i, j) for i in range(4) for j in range(4)}
    assert len(seeds) == 16 and sample_seed(None, 0, 0) is None
    with pytest.raises(ValueError, match="sampling.temperature"):
        SamplingConfig(temperature=-1)


def test_worker_records_and_unknown_engine(prompts, reference):
    _, tok = reference
    with pytest.raises(ValueError, match=r"rollout\.engine.*'vllm', 'hf'"):
        RolloutWorker(str(tiny_model_dir()), RolloutConfig(engine="sglang"))
    worker = RolloutWorker(str(tiny_model_dir()), RolloutConfig(engine="hf"))
    recs = [Prompt(TaskExample(f"p{i}", "toy", [], {}), np.asarray(p, np.int32)) for i, p in enumerate(prompts[:2])]
    rollouts = list(worker.generate(recs, SamplingConfig(n=2, temperature=1.0, max_new_tokens=6, seed=0), policy_version=7))
    assert sorted((r.prompt_uid, r.sample_index) for r in rollouts) == [("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1)]
    for r in rollouts:
        src = recs[int(r.prompt_uid[1:])]
        assert r.policy_version == 7 and r.response_ids.dtype == np.int32 and r.behaviour_logprobs.dtype == np.float32
        np.testing.assert_array_equal(r.prompt_ids, src.prompt_ids)
        assert not np.shares_memory(r.prompt_ids, src.prompt_ids)
        assert r.text == tok.decode(r.response_ids, skip_special_tokens=True)
    # stream(): each record preceded by its prompt uid and token count
    streamed = list(worker.stream(recs, SamplingConfig(n=2, temperature=1.0, max_new_tokens=6, seed=0), policy_version=7))
    assert streamed[0::2] == [(r.prompt_uid, len(r.prompt_ids) + len(r.response_ids)) for r in streamed[1::2]]
    assert [r.response_ids.tolist() for r in streamed[1::2]] == [r.response_ids.tolist() for r in rollouts]
    assert worker.version() == 0
    state = {"lm_head.weight": np.zeros_like(worker.engine.model.lm_head.weight.detach().numpy())}
    assert worker.update_weights(state, 3) >= 0 and worker.version() == 3
    # all-zero output layer: every token has log-prob -log(V)
    lp = worker.sequence_logprobs(prompts[0], [5, 6])
    np.testing.assert_allclose(lp, [-np.log(len(tok))] * 2, atol=1e-5)
