"""What a causal LM's output layer computes, for code that forms logits itself (chunked gathering,
teacher scoring) instead of calling the model's own head."""

from __future__ import annotations

from torch import Tensor


def output_embedding(model) -> Tensor:
    """The LM head's weight, after checking that logits really are ``hidden @ weightᵀ``.

    Heads with a bias (Phi), soft-capped logits (Gemma 2) or a logit scale (Cohere) compute
    something else; computing log-probs from the weight alone would be silently wrong there.
    """
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    problems = []
    if getattr(head, "bias", None) is not None:
        problems.append("the LM head has a bias")
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, key, None) not in (None, 1.0):
            problems.append(f"config.{key}={getattr(config, key)!r}")
    if problems:
        raise NotImplementedError(
            f"{type(model).__name__}: logits are not hidden @ weightᵀ ({', '.join(problems)}); "
            "chunked log-prob gathering does not support this model family yet"
        )
    return head.weight
