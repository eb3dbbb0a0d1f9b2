"""Chunked log-prob gathering against the plain ``log_softmax(h @ Wᵀ / T)`` computation."""

import pytest
import torch

from distil_ray.learner.logprobs import GatheredLogprobs, gather_logprobs

N, H, V, K = 20, 6, 13, 5


def make_inputs(seed, n=N, h=H, v=V, k=K, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=gen, dtype=dtype).requires_grad_()
    token_ids = torch.randint(0, v, (n,), generator=gen)
    topk_ids = torch.randint(0, v, (n, k), generator=gen)
    # Force repeats: a top-k id equal to the token, and a top-k id appearing twice in a row.
    topk_ids[:, 0] = token_ids
    topk_ids[:, 2] = topk_ids[:, 1]
    return hidden, weight, token_ids, topk_ids, gen


def naive(hidden, weight, token_ids, topk_ids, temperature, student_k=0):
    logp = torch.log_softmax(hidden @ weight.T / temperature, dim=-1)
    tok = logp.gather(1, token_ids[:, None]).squeeze(1)
    topk = None if topk_ids is None else logp.gather(1, topk_ids)
    entropy = -(logp.exp() * logp).sum(-1)
    student = logp.topk(student_k, dim=-1) if student_k else None
    return tok, topk, entropy, student


def upstream_loss(tok, topk, gen):
    """A loss with random weights on every gathered entry, so each gradient path is exercised."""
    a = torch.randn(tok.shape, generator=gen, dtype=tok.dtype)
    loss = (a * tok).sum()
    if topk is not None:
        b = torch.randn(topk.shape, generator=gen, dtype=topk.dtype)
        loss = loss + (b * topk).sum()
    return loss


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, N, 64])  # 3 and 7 do not divide N; 64 > N
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_naive(chunk_size, temperature):
    hidden, weight, token_ids, topk_ids, gen = make_inputs(seed=chunk_size)
    out = gather_logprobs(hidden, weight, token_ids, topk_ids, temperature=temperature,
                          chunk_size=chunk_size, with_student_topk=4)
    ref_tok, ref_topk, ref_entropy, ref_student = naive(hidden, weight, token_ids, topk_ids,
                                                        temperature, student_k=4)

    torch.testing.assert_close(out.token_logprobs, ref_tok, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.topk_logprobs, ref_topk, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.entropy, ref_entropy, rtol=0, atol=1e-9)
    assert torch.equal(out.student_topk_ids, ref_student.indices)
    torch.testing.assert_close(out.student_topk_logprobs, ref_student.values, rtol=0, atol=1e-9)
    assert not out.entropy.requires_grad and not out.student_topk_logprobs.requires_grad

    # The same random upstream weights for both computations.
    state = gen.get_state()
    got = grads(upstream_loss(out.token_logprobs, out.topk_logprobs, gen), hidden, weight)
    gen.set_state(state)
    want = grads(upstream_loss(ref_tok, ref_topk, gen), hidden, weight)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-9)


def test_duplicate_ids_accumulate():
    # Ask for the same id three times in one row: the gradient is three times one request's.
    hidden, weight, _, _, _ = make_inputs(seed=1, n=4)
    ids = torch.tensor([2, 5, 5, 0])
    once = gather_logprobs(hidden, weight, ids, None, chunk_size=3).token_logprobs.sum()
    g_once = grads(once, hidden, weight)
    out = gather_logprobs(hidden, weight, ids, torch.stack([ids, ids], 1), chunk_size=3)
    thrice = out.token_logprobs.sum() + out.topk_logprobs.sum()
    for g3, g1 in zip(grads(thrice, hidden, weight), g_once):
        torch.testing.assert_close(g3, 3 * g1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [4, 256])
def test_without_topk_ids(chunk_size):
    hidden, weight, token_ids, _, gen = make_inputs(seed=2)
    out = gather_logprobs(hidden, weight, token_ids, None, temperature=1.3,
                          chunk_size=chunk_size)
    ref_tok, _, ref_entropy, _ = naive(hidden, weight, token_ids, None, 1.3)
    assert out.topk_logprobs is None
    assert out.student_topk_ids is None and out.student_topk_logprobs is None
    torch.testing.assert_close(out.token_logprobs, ref_tok, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.entropy, ref_entropy, rtol=0, atol=1e-9)

    a = torch.randn(N, generator=gen, dtype=torch.float64)
    got = grads((a * out.token_logprobs).sum(), hidden, weight)
    want = grads((a * ref_tok).sum(), hidden, weight)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-9)


def test_result_is_a_tuple():
    hidden, weight, token_ids, topk_ids, _ = make_inputs(seed=3)
    out = gather_logprobs(hidden, weight, token_ids, topk_ids)
    assert isinstance(out, GatheredLogprobs)
    tok, topk = out[:2]
    assert tok.shape == (N,) and topk.shape == (N, K)
    assert out._fields == ("token_logprobs", "topk_logprobs", "entropy", "student_topk_ids",
                           "student_topk_logprobs")


def test_gradcheck():
    hidden, weight, token_ids, topk_ids, _ = make_inputs(seed=4, n=5, h=3, v=7, k=3)

    def fn(h, w):
        return gather_logprobs(h, w, token_ids, topk_ids, temperature=0.8, chunk_size=2)[:2]

    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_frozen_weight():
    hidden, weight, token_ids, topk_ids, gen = make_inputs(seed=5)
    weight = weight.detach()  # requires_grad=False, like a frozen LM head
    out = gather_logprobs(hidden, weight, token_ids, topk_ids, temperature=0.9, chunk_size=6)
    ref_tok, ref_topk, _, _ = naive(hidden, weight, token_ids, topk_ids, 0.9)

    state = gen.get_state()
    upstream_loss(out.token_logprobs, out.topk_logprobs, gen).backward()
    gen.set_state(state)
    (want,) = grads(upstream_loss(ref_tok, ref_topk, gen), hidden)
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, want, rtol=0, atol=1e-9)


def test_frozen_hidden_gives_weight_gradient_only():
    hidden, weight, token_ids, topk_ids, _ = make_inputs(seed=6)
    hidden = hidden.detach()
    out = gather_logprobs(hidden, weight, token_ids, topk_ids, chunk_size=6)
    ref_tok, ref_topk, _, _ = naive(hidden, weight, token_ids, topk_ids, 1.0)
    (got,) = grads(out.token_logprobs.sum() + out.topk_logprobs.sum(), weight)
    (want,) = grads(ref_tok.sum() + ref_topk.sum(), weight)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_float32_inputs_compute_in_float32():
    hidden, weight, token_ids, topk_ids, _ = make_inputs(seed=7, dtype=torch.float32)
    out = gather_logprobs(hidden, weight, token_ids, topk_ids, temperature=0.7, chunk_size=6)
    ref_tok, ref_topk, _, _ = naive(hidden.double(), weight.double(), token_ids, topk_ids, 0.7)
    assert out.token_logprobs.dtype == torch.float32
    torch.testing.assert_close(out.token_logprobs.double(), ref_tok, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.topk_logprobs.double(), ref_topk, rtol=0, atol=1e-5)


def test_bfloat16_inputs():
    hidden, weight, token_ids, topk_ids, _ = make_inputs(seed=8, dtype=torch.bfloat16)
    out = gather_logprobs(hidden, weight, token_ids, topk_ids, chunk_size=6)
    # Reference: the bfloat16 LM-head logits, upcast, then a float32 log-softmax.
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    logits = (hidden.detach() @ weight.detach().T).float()
    ref = torch.log_softmax(logits, -1)
    assert out.token_logprobs.dtype == torch.float32
    torch.testing.assert_close(out.token_logprobs, ref.gather(1, token_ids[:, None])[:, 0],
                               rtol=0, atol=1e-5)

    (out.token_logprobs.sum() + out.topk_logprobs.sum()).backward()
    ref_tok, ref_topk, _, _ = naive(h32, w32, token_ids, topk_ids, 1.0)
    (ref_tok.sum() + ref_topk.sum()).backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad.float(), h32.grad, rtol=0.05, atol=0.05)
    torch.testing.assert_close(weight.grad.float(), w32.grad, rtol=0.05, atol=0.05)


def test_empty_batch():
    _, weight, _, _, _ = make_inputs(seed=9)
    hidden = torch.zeros(0, H, dtype=torch.float64, requires_grad=True)
    out = gather_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long),
                          torch.zeros(0, K, dtype=torch.long))
    assert out.token_logprobs.shape == (0,) and out.topk_logprobs.shape == (0, K)
    out.token_logprobs.sum().backward()
    assert hidden.grad.shape == (0, H)


@pytest.mark.parametrize("change, error, match", [
    (dict(hidden=torch.zeros(N, H, 1)), ValueError, "hidden must be"),
    (dict(weight=torch.zeros(V, H + 1, dtype=torch.float64)), ValueError, "hidden sizes"),
    (dict(weight=torch.zeros(V, H, dtype=torch.float32)), TypeError, "dtype"),
    (dict(token_ids=torch.zeros(N + 1, dtype=torch.long)), ValueError, "token_ids must be"),
    (dict(token_ids=torch.zeros(N)), TypeError, "integer"),
    (dict(topk_ids=torch.zeros(N, dtype=torch.long)), ValueError, "topk_ids must be"),
    (dict(topk_ids=torch.full((N, K), V)), ValueError, "vocabulary"),
    (dict(token_ids=torch.full((N,), -1)), ValueError, "vocabulary"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(with_student_topk=V + 1), ValueError, "with_student_topk"),
])
def test_bad_inputs_are_rejected(change, error, match):
    hidden, weight, token_ids, topk_ids, _ = make_inputs(seed=10)
    args = dict(hidden=hidden, weight=weight, token_ids=token_ids, topk_ids=topk_ids)
    args.update(change)
    kwargs = {k: args.pop(k) for k in ("temperature", "chunk_size", "with_student_topk")
              if k in args}
    with pytest.raises(error, match=match):
        gather_logprobs(args["hidden"], args["weight"], args["token_ids"], args["topk_ids"],
                        **kwargs)
