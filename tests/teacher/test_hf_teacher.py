"""HF teacher scoring equals a naive full forward at the response positions."""

import pytest
import torch

from distil_ray.models import TinyModelConfig, build_tiny_model, load_tiny
from distil_ray.engines.hf import score_topk


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model, _ = load_tiny(build_tiny_model(TinyModelConfig(seed=5), tmp_path_factory.mktemp("tiny") / "m"))
    return model.double().eval()


def test_scores_match_naive_forward(model):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 400, (n,), generator=gen).tolist() for n in (5, 9)]
    responses = [torch.randint(3, 400, (n,), generator=gen).tolist() for n in (7, 3)]
    scores = score_topk(model, prompts, responses, k=6, temperature=0.8, chunk_size=2)
    for prompt, response, s in zip(prompts, responses, scores):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float() / 0.8, -1)
        rows = logp[len(prompt) - 1 : len(prompt) - 1 + len(response)]
        ref_lp, ref_ids = rows.topk(6, -1)
        assert torch.equal(s.topk_ids, ref_ids)
        torch.testing.assert_close(s.topk_logprobs, ref_lp, rtol=0, atol=1e-6)
        torch.testing.assert_close(s.token_logprobs, rows.gather(-1, torch.tensor(response)[:, None])[:, 0], rtol=0, atol=1e-6)
        assert s.topk_ids.shape == (len(response), 6)
        # normalised over the full vocabulary: the top-k mass is below 1
        assert (s.topk_logprobs.exp().sum(-1) < 1).all()


def test_empty_prompt_is_rejected(model):
    with pytest.raises(ValueError, match="empty"):
        score_topk(model, [[]], [[5, 6]], k=2)
