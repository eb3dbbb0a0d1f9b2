"""Chunked gathering on CUDA in the dtypes training uses, against a float64 CPU reference."""

import pytest
import torch

from distil_ray.learner.logprobs import gather_logprobs

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_matches_float64_reference(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    N, H, V, K = 512, 128, 32_000, 20
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64) * 0.5
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.5
    tokens = torch.randint(0, V, (N,), generator=gen)
    topk = torch.randint(0, V, (N, K), generator=gen)
    up_tok, up_topk = torch.randn(N, generator=gen, dtype=torch.float64), torch.randn(N, K, generator=gen, dtype=torch.float64)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = torch.log_softmax(h @ w.T, -1)
    ((logp.gather(-1, tokens[:, None])[:, 0] * up_tok).sum() + (logp.gather(-1, topk) * up_topk).sum()).backward()

    hc = hidden.to("cuda", dtype).requires_grad_()
    wc = weight.to("cuda", dtype).requires_grad_()
    out = gather_logprobs(hc, wc, tokens.cuda(), topk.cuda(), chunk_size=128)
    ((out.token_logprobs.double() * up_tok.cuda()).sum() + (out.topk_logprobs.double() * up_topk.cuda()).sum()).backward()

    torch.testing.assert_close(out.token_logprobs.double().cpu(), logp.gather(-1, tokens[:, None])[:, 0].detach(), atol=tol, rtol=tol)
    scale = h.grad.abs().max()
    torch.testing.assert_close(hc.grad.double().cpu() / scale, h.grad / scale, atol=tol, rtol=tol)
    scale = w.grad.abs().max()
    torch.testing.assert_close(wc.grad.double().cpu() / scale, w.grad / scale, atol=tol, rtol=tol)
