"""The engine on a Hugging Face causal LM: the dependency-light CPU backend, and the reference the
vLLM engine is checked against.

Generation: all (prompt, sample) pairs of a call go through one left-padded ``generate``; the
per-step scores it returns are the *processed* logits (temperature and top-p applied when
sampling), so their log-softmax at the sampled token is the behaviour log-prob, as vLLM's
``processed_logprobs``. Samples come out when the batch ends (HF has no per-sequence streaming);
the order of the yielded pairs is still only "some completion order" to callers.

Teacher scoring (:func:`score_topk`): the sequence scored is ``prompt_ids + response_ids`` — the
student's response *token ids*, never re-tokenised text — so position t of the result lines up
with the student's token t. Log-probs are normalised over the full vocabulary; the logits are
formed a chunk of positions at a time, so ``[T, V]`` never exists at once for long responses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from distil_ray.engines.base import (
    EngineOptions,
    Sample,
    SamplingConfig,
    TeacherScores,
    check_pairs,
    empty_scores,
    stop_cut,
)
from distil_ray.models.lm_head import output_embedding


def load_named_tensors(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy HF-named tensors into ``model``'s parameters/buffers in place; returns the count.

    A subset is fine (bucketed sync sends the state in pieces), an unknown name or a shape
    mismatch is an error: silently skipping it would leave the policy stale without a trace.
    """
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    count = 0
    with torch.no_grad():
        for name, tensor in named_tensors:
            if name not in targets:
                raise ValueError(f"weight {name!r} is not a parameter of {type(model).__name__}")
            dest = targets[name]
            tensor = torch.as_tensor(tensor)
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != model's {tuple(dest.shape)}")
            dest.copy_(tensor.to(dtype=dest.dtype, device=dest.device))
            count += 1
    return count


@torch.no_grad()
def forward_logprobs(model, prompt: list[int], response: list[int]) -> list[float]:
    """T=1 log-prob of each response token given the prompt, from one full forward."""
    if not response:
        return []
    if not prompt:
        raise ValueError("the prompt is empty: the first response token has no state")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt) + list(response)], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, ids[0, len(prompt) :, None])[:, 0].tolist()


@torch.no_grad()
def score_topk(
    model,
    teacher_prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    k: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> list[TeacherScores]:
    """Score each (teacher prompt, response) pair; one forward per pair (no padding to get wrong).
    Call it with the model in eval mode: dropout would add noise to the teacher's log-probs."""
    check_pairs(teacher_prompt_ids, response_ids)
    weight = output_embedding(model)
    body = model.get_decoder()
    device = weight.device
    out = []
    for prompt, response in zip(teacher_prompt_ids, response_ids):
        if len(response) == 0:  # nothing to score: skip the forward pass
            out.append(empty_scores(min(k, weight.shape[0])))
            continue
        ids = torch.tensor([list(prompt) + list(response)], device=device)
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state[0]
        # the state that predicts response token t sits one position earlier
        states = hidden[len(prompt) - 1 : len(prompt) - 1 + len(response)]
        targets = ids[0, len(prompt) :]
        top_ids, top_lp, tok_lp = [], [], []
        for start in range(0, len(response), chunk_size):
            logits = (states[start : start + chunk_size] @ weight.T).float() / temperature
            logp = torch.log_softmax(logits, -1)
            lp, idx = logp.topk(min(k, logp.shape[-1]), -1)
            top_ids.append(idx)
            top_lp.append(lp)
            tok_lp.append(logp.gather(-1, targets[start : start + chunk_size, None])[:, 0])
        out.append(TeacherScores(torch.cat(top_ids).cpu(), torch.cat(top_lp).cpu(), torch.cat(tok_lp).cpu()))
    return out


class HFEngine:
    """The :class:`~distil_ray.engines.base.Engine` on a HF causal LM (``generate`` and a plain forward)."""

    def __init__(self, model_path: str, options: EngineOptions | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        options = options or EngineOptions()
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, local_files_only=True, dtype=getattr(torch, options.dtype)
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.seed = options.seed
        self._calls = 0
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else eos[0]

    def _decode(self, ids) -> str:
        # as vLLM matches stop strings: on the text with special tokens skipped
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> Iterator[tuple[int, int, Sample]]:
        if not prompts:
            return
        keys = [(i, j) for i in range(len(prompts)) for j in range(sampling.n)]
        rows = [list(map(int, prompts[i])) for i, _ in keys]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, width - len(row) :] = torch.tensor(row)
            mask[r, width - len(row) :] = 1
        kwargs: dict = {"do_sample": False}
        if not sampling.greedy:
            # top_k=0 switches off HF's default top-k=50 (vLLM applies none).
            kwargs = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        # An unseeded call still gets a fresh, reproducible-per-engine stream.
        seed = sampling.seed if sampling.seed is not None else self.seed + 7919 * self._calls
        self._calls += 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=self.eos_ids,
                pad_token_id=self.pad_id,
                output_scores=True,
                return_dict_in_generate=True,
                # diverged weights give NaN/inf logits: sample anyway (as vLLM does) and let the
                # learner's guard on the loss stop the run, rather than crash in torch.multinomial
                remove_invalid_values=True,
                **kwargs,
            )
        generated = out.sequences[:, width:]
        # scores[t] is [B, V]: the processed logits step t sampled from.
        logp = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)
        token_lp = logp.gather(-1, generated[:, :, None])[:, :, 0]
        for r, (i, j) in enumerate(keys):
            tokens = generated[r].tolist()
            end = next((t + 1 for t, tok in enumerate(tokens) if tok in self.eos_ids), None)
            reason = "stop" if end is not None else "length"
            tokens = tokens[:end] if end is not None else tokens
            cut = stop_cut(tokens, self._decode, sampling.stop)
            if cut is not None:
                tokens, reason = tokens[:cut], "stop"
            yield i, j, Sample(tokens, token_lp[r, : len(tokens)].tolist(), reason)

    def score_topk(self, prompt_ids: list[list[int]], response_ids: list[list[int]], k: int) -> list[TeacherScores]:
        return score_topk(self.model, prompt_ids, response_ids, k)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_named_tensors(self.model, named_tensors)

    def sequence_logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        return forward_logprobs(self.model, prompt, response)
