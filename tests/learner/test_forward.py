"""The learner's policy forward (chunked gathering on a real HF model) equals the naive path:
full logits → log_softmax → gather, values and parameter gradients, float64, left padding included."""

import copy

import pytest
import torch

from distil_ray.algorithms.losses import distil_loss
from distil_ray.learner.attention import PACKED_ATTENTION, register
from distil_ray.learner.forward import response_logprobs
from distil_ray.models import TinyModelConfig, build_tiny_model, load_tiny


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    path = build_tiny_model(TinyModelConfig(seed=3), tmp_path_factory.mktemp("tiny") / "model")
    model, tokenizer = load_tiny(path)
    return model.double().eval(), tokenizer


def make_batch(vocab, seed=0):
    """Two left-padded sequences: prompt then response, with a response mask."""
    gen = torch.Generator().manual_seed(seed)
    B, L, K = 2, 12, 5
    input_ids = torch.randint(3, vocab, (B, L), generator=gen)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    input_ids[1, :3] = 0
    response_mask = torch.zeros(B, L, dtype=torch.long)
    response_mask[0, 6:] = 1
    response_mask[1, 8:11] = 1  # ends early: the last position is padding after EOS
    topk_ids = torch.randint(0, vocab, (B, L, K), generator=gen)
    topk_ids[..., 0] = input_ids  # the sampled token also among the top-k: a duplicate id
    return input_ids, attention_mask, response_mask, topk_ids


def naive(model, input_ids, attention_mask, response_mask, topk_ids, temperature):
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits
    logp = torch.log_softmax(logits[:, :-1] / temperature, -1)
    tok = logp.gather(-1, input_ids[:, 1:, None])[..., 0]
    topk = logp.gather(-1, topk_ids[:, 1:])
    pad = lambda x: torch.cat([torch.zeros_like(x[:, :1]), x], 1) * (  # noqa: E731
        response_mask if x.dim() == 2 else response_mask[..., None]
    )
    return pad(tok), pad(topk)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_naive_values_and_gradients(model_and_tokenizer, temperature):
    model, tokenizer = model_and_tokenizer
    input_ids, attention_mask, response_mask, topk_ids = make_batch(len(tokenizer))
    params = [p for p in model.parameters() if p.requires_grad]

    def grads_of(tok, topk):
        teacher = torch.log_softmax(torch.randn(topk.shape, generator=torch.Generator().manual_seed(1), dtype=topk.dtype), -1)
        loss, _ = distil_loss(tok, topk, teacher, response_mask, loss_agg="seq-sum")
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    out = response_logprobs(model, input_ids, attention_mask, response_mask, topk_ids, temperature=temperature, chunk_size=4)
    ref_tok, ref_topk = naive(model, input_ids, attention_mask, response_mask, topk_ids, temperature)
    torch.testing.assert_close(out.token_logprobs, ref_tok, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.topk_logprobs, ref_topk, rtol=0, atol=1e-9)
    assert (out.token_logprobs[response_mask == 0] == 0).all()
    assert (out.entropy[response_mask.bool()] > 0).all()

    loss, grads = grads_of(out.token_logprobs, out.topk_logprobs)
    ref_loss, ref_grads = grads_of(ref_tok, ref_topk)
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-10)
    for g, r, p in zip(grads, ref_grads, params):
        if r is None:
            assert g is None or not g.any()
            continue
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10)


def test_response_at_position_zero_is_rejected(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    input_ids, attention_mask, response_mask, topk_ids = make_batch(len(tokenizer))
    response_mask[0, 0] = 1
    with pytest.raises(ValueError, match="position 0"):
        response_logprobs(model, input_ids, attention_mask, response_mask, topk_ids)


def test_heads_that_are_not_a_plain_matmul_are_refused(model_and_tokenizer):
    import copy

    model, _ = model_and_tokenizer
    with_bias = copy.deepcopy(model)
    with_bias.lm_head.bias = torch.nn.Parameter(torch.zeros(with_bias.lm_head.out_features, dtype=torch.float64))
    capped = copy.deepcopy(model)
    capped.config.final_logit_softcapping = 30.0
    for m in (with_bias, capped):
        with pytest.raises(NotImplementedError, match="not hidden @ weight"):
            response_logprobs(m, *make_batch(m.config.vocab_size))


@pytest.mark.parametrize("attention", ["sdpa", PACKED_ATTENTION])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_forward_equals_one_sequence_at_a_time(model_and_tokenizer, temperature, attention):
    """Packed (real tokens only, position ids restarting per row, no mask) equals each row run
    alone, values and parameter gradients, in float64; three rows of different padding. With
    ``sdpa`` transformers masks the pack densely; the learner's packed attention splits it by the
    rows' boundaries (the reference rows always run through ``sdpa``)."""
    reference, tokenizer = model_and_tokenizer
    model = copy.deepcopy(reference)
    model.set_attn_implementation(register() if attention == PACKED_ATTENTION else attention)
    gen = torch.Generator().manual_seed(4)
    B, L, K = 3, 14, 4
    input_ids = torch.randint(3, len(tokenizer), (B, L), generator=gen)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, :5] = 0
    attention_mask[2, :9] = 0
    input_ids[attention_mask == 0] = 0
    response_mask = torch.zeros(B, L, dtype=torch.long)
    response_mask[0, 7:] = 1
    response_mask[1, 9:13] = 1
    response_mask[2, 11:] = 1
    topk_ids = torch.randint(0, len(tokenizer), (B, L, K), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    teacher = torch.log_softmax(torch.randn(B, L, K, generator=gen, dtype=torch.float64), -1)

    def run(packed, rows=slice(None)):
        out = response_logprobs(model if packed else reference, input_ids[rows], attention_mask[rows], response_mask[rows], topk_ids[rows],
                                temperature=temperature, chunk_size=5, packed=packed)
        loss, _ = distil_loss(out.token_logprobs, out.topk_logprobs, teacher[rows], response_mask[rows],
                              loss_agg="seq-sum", denominator=B)
        return out, loss

    packed, loss = run(True)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    alone_loss = 0.0
    for b in range(B):  # one row at a time: no padding, no other sequence to attend to
        out, loss_b = run(False, slice(b, b + 1))
        torch.testing.assert_close(packed.token_logprobs[b:b + 1], out.token_logprobs, rtol=0, atol=1e-10)
        torch.testing.assert_close(packed.topk_logprobs[b:b + 1], out.topk_logprobs, rtol=0, atol=1e-10)
        alone_loss = alone_loss + loss_b
    alone_grads = torch.autograd.grad(alone_loss, [p for p in reference.parameters() if p.requires_grad],
                                      allow_unused=True)
    for g, h in zip(grads, alone_grads):
        if g is None or h is None:
            assert g is None and h is None
            continue
        torch.testing.assert_close(g, h, rtol=0, atol=1e-10)
