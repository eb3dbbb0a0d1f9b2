"""The engine on vLLM's offline ``LLM``: token ids in, token ids and behaviour log-probs out; the
teacher's top-k on given token ids.

Streaming: every (prompt, sample) pair is its own request (n=1, with its own seed), queued with
``LLM.enqueue``; the engine's step loop is then driven here, so a sample is handed on the moment
it finishes instead of when the whole batch does.

Behaviour log-probs come from ``logprobs_mode="processed_logprobs"``: the log-prob of the sampled
token under the distribution it was actually drawn from (temperature, then top-p, applied) —
what an importance ratio against the learner's tempered log-probs needs. vLLM's default
("raw_logprobs") reports the T=1 model distribution instead.

Teacher scoring uses ``prompt_logprobs``: ``teacher_prompt + response`` goes in as the *prompt* of
a one-token request, and the log-probs vLLM computes for every prompt position are read back at
the response positions (T=1, normalised over the full vocabulary).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from distil_ray.engines.base import (
    EngineOptions,
    Sample,
    SamplingConfig,
    TeacherScores,
    check_pairs,
    empty_scores,
    sample_seed,
)

# vLLM reads these when it is imported / builds its engine, so they are set before the import.
_VLLM_ENV = {
    # The engine core runs in this process: no extra process per engine, and the actor's CPU
    # share (Ray's num_cpus, torch threads) applies to the model's work.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # vLLM's CPU backend would otherwise pin its OpenMP threads to cores (OMP_PLACES /
    # OMP_PROC_BIND) whenever it takes the multiprocess path; on a small shared machine
    # that fights every other process for the same cores.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


def _prepare_env() -> None:
    for key, value in _VLLM_ENV.items():
        if key == "VLLM_ENABLE_V1_MULTIPROCESSING":
            os.environ[key] = value  # required: the in-process engine is what this module drives
        else:
            os.environ.setdefault(key, value)


def make_llm(
    model_path: str,
    *,
    kv_cache_memory_bytes: int = 64 << 20,
    max_num_seqs: int = 64,
    max_model_len: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
    enforce_eager: bool = True,
    max_logprobs: int = 20,
    weight_transfer: str | None = None,
    **llm_kwargs,
):
    """A ``vllm.LLM`` configured for in-process use by the rollout and teacher actors.
    ``weight_transfer``: the weight-transfer backend its workers open (vLLM's ``nccl``, or
    :data:`~distil_ray.engines.gloo_transfer.BACKEND`), None for none."""
    _prepare_env()
    import torch
    from vllm import LLM

    if weight_transfer is not None:
        from vllm.config import WeightTransferConfig

        from distil_ray.engines import gloo_transfer

        if weight_transfer == gloo_transfer.BACKEND:
            gloo_transfer.register()  # in this process: the in-process engine's worker builds it here
        llm_kwargs["weight_transfer_config"] = WeightTransferConfig(backend=weight_transfer)

    if not torch.cuda.is_available():
        # The CPU backend prefills at most a few thousand tokens per engine step and splits longer
        # prompts across steps, which its seeded sampler cannot do ("CPU Generator does not use
        # offset"): prefill every prompt in one step instead.
        llm_kwargs.setdefault("enable_chunked_prefill", False)
        llm_kwargs.setdefault("max_num_batched_tokens", max(max_model_len or 0, 8192))
    return LLM(
        model=str(model_path),
        tokenizer=str(model_path),
        dtype=dtype,
        seed=seed,
        kv_cache_memory_bytes=int(kv_cache_memory_bytes),
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
        logprobs_mode="processed_logprobs",
        max_logprobs=max_logprobs,
        **llm_kwargs,
    )


def reload_weights(llm, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named tensors into the running model, then drop cached KV blocks: they were
    computed by the old weights and prefix caching would otherwise reuse them."""
    weights = [(name, torch.as_tensor(t)) for name, t in named_tensors]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    llm.reset_prefix_cache()


def prompt_token_logprobs(llm, prompt: list[int], response: list[int]) -> list[float]:
    """Log-probs (T=1, full vocabulary) of ``response`` continuing ``prompt``, via prompt_logprobs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if not response:
        return []
    if not prompt:
        raise ValueError("the prompt is empty: the first response token has no state")
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    (out,) = llm.generate([TokensPrompt(prompt_token_ids=list(prompt) + list(response))], params, use_tqdm=False)
    rows = out.prompt_logprobs[len(prompt) :]
    return [row[token].logprob for row, token in zip(rows, response)]


class VLLMEngine:
    """The :class:`~distil_ray.engines.base.Engine` on an in-process ``vllm.LLM``."""

    def __init__(self, model_path: str, options: EngineOptions | None = None):
        options = options or EngineOptions()
        self.max_logprobs = options.max_logprobs
        # CUDA graphs (and torch.compile) on a GPU; the CPU build runs eagerly
        eager = options.enforce_eager if options.enforce_eager is not None else not torch.cuda.is_available()
        self.llm = make_llm(
            model_path, dtype=options.dtype, seed=options.seed, kv_cache_memory_bytes=options.kv_cache_memory_bytes,
            max_num_seqs=options.max_num_seqs, max_logprobs=options.max_logprobs,
            max_model_len=options.max_model_len, enforce_eager=eager, weight_transfer=options.weight_transfer,
        )
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> Iterator[tuple[int, int, Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        inputs, params, keys = [], [], []
        for i, prompt in enumerate(prompts):
            for j in range(sampling.n):
                inputs.append(TokensPrompt(prompt_token_ids=[int(t) for t in prompt]))
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        max_tokens=sampling.max_new_tokens,
                        stop=list(sampling.stop) or None,
                        logprobs=0,  # just the sampled token's log-prob
                        seed=sample_seed(sampling.seed, i, j),
                    )
                )
                keys.append((i, j))
        if not inputs:
            return
        # enqueue returns vLLM's internal ids ("<external>-<random suffix>") while outputs carry
        # the external id, which LLM draws from a counter (digits, no dash).
        internal_ids = self.llm.enqueue(inputs, params, use_tqdm=False)
        pending = {rid.split("-", 1)[0]: (rid, key) for rid, key in zip(internal_ids, keys)}
        engine = self.llm.llm_engine
        try:
            while pending and engine.has_unfinished_requests():
                for out in engine.step():
                    if not out.finished or out.request_id not in pending:
                        continue
                    _, (i, j) = pending.pop(out.request_id)
                    completion = out.outputs[0]
                    token_ids = list(completion.token_ids)
                    logprobs = [row[t].logprob for row, t in zip(completion.logprobs, token_ids)]
                    yield i, j, Sample(token_ids, logprobs, completion.finish_reason or "length")
        finally:
            # A consumer that stops early (or an error) must not leave requests running in the
            # engine: the next call's step loop would spend time on them.
            if pending:
                engine.abort_request([rid for rid, _ in pending.values()], internal=True)

    def score_topk(self, prompt_ids: list[list[int]], response_ids: list[list[int]], k: int) -> list[TeacherScores]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_pairs(prompt_ids, response_ids)
        k = min(int(k), self.vocab_size)
        if k > self.max_logprobs:
            raise ValueError(
                f"teacher top-k={k} exceeds the engine's max_logprobs={self.max_logprobs}; "
                "the engine must be built with max_logprobs >= teacher.topk"
            )
        # empty responses have nothing to score: they skip the engine
        todo = [i for i, r in enumerate(response_ids) if len(r) > 0]
        out: list[TeacherScores] = [empty_scores(k) for _ in response_ids]
        if todo:
            # One batched call: vLLM schedules the prefills together. max_tokens=1 because only the
            # prompt positions matter; detokenize=False skips decoding the k strings per position;
            # flat_logprobs=True returns each request's log-probs as flat lists instead of one dict
            # of Logprob objects per position, which _extract_topk reads with numpy.
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False,
                                    flat_logprobs=True)
            inputs = [
                TokensPrompt(prompt_token_ids=[int(t) for t in prompt_ids[i]] + [int(t) for t in response_ids[i]])
                for i in todo
            ]
            results = self.llm.generate(inputs, params, use_tqdm=False)
            for i, result in zip(todo, results):
                out[i] = _extract_topk(result.prompt_logprobs, len(prompt_ids[i]), response_ids[i], k)
        return out

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        reload_weights(self.llm, named_tensors)

    def weight_transfer(self, phase: str, info: dict | None = None) -> None:
        """vLLM's weight-transfer protocol (the engine was built with ``EngineOptions.weight_transfer``):
        ``init`` joins the trainer's group; ``receive`` is one whole update (start, receive while
        the trainer sends, finish), in one call so that nothing runs on the half-loaded model;
        ``shutdown`` leaves the group."""
        if phase == "init":
            self.llm.init_weight_transfer_engine({"init_info": info})
        elif phase == "receive":
            self.llm.start_weight_update()
            self.llm.update_weights({"update_info": info})
            self.llm.finish_weight_update()
            self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        elif phase == "shutdown":
            self.llm.shutdown_weight_transfer_engine()
        else:
            raise ValueError(f"weight transfer phase {phase!r}: one of init, receive, shutdown")

    def sequence_logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        return prompt_token_logprobs(self.llm, prompt, response)


def _extract_topk(prompt_logprobs, prompt_len: int, response: Sequence[int], k: int) -> TeacherScores:
    """The response rows of vLLM's flat prompt log-probs as ``[T, k]`` arrays.

    Row ``p`` (the prediction of prompt token ``p``) holds ``k + 1`` entries: first the token that
    is actually there (its log-prob and rank), then the top-k in rank order 1..k
    (``vllm.logprobs.append_logprobs_for_next_position``). Reading them by index costs a few numpy
    operations per request instead of a Python dict per position.
    """
    from vllm.logprobs import FlatLogprobs

    if not isinstance(prompt_logprobs, FlatLogprobs):
        raise TypeError(f"expected vLLM's FlatLogprobs (flat_logprobs=True), got {type(prompt_logprobs).__name__}")
    T = len(response)
    rows = slice(prompt_len, prompt_len + T)
    starts = np.asarray(prompt_logprobs.start_indices[rows], dtype=np.int64)
    ends = np.asarray(prompt_logprobs.end_indices[rows], dtype=np.int64)
    if len(starts) != T:
        raise RuntimeError(f"vLLM returned {len(starts)} prompt log-prob rows for {T} response tokens")
    if T and not np.all(ends - starts == k + 1):
        raise RuntimeError(f"vLLM returned {sorted(set((ends - starts).tolist()))} log-probs per position, "
                           f"expected {k + 1} (the token and the top-{k})")
    lo, hi = (int(starts[0]), int(ends[-1])) if T else (0, 0)
    ids = np.asarray(prompt_logprobs.token_ids[lo:hi], dtype=np.int64)
    logprobs = np.asarray(prompt_logprobs.logprobs[lo:hi], dtype=np.float32)
    first = starts - lo
    if T and not np.array_equal(ids[first], np.asarray(response, dtype=np.int64)):
        raise RuntimeError("vLLM's prompt log-probs do not line up with the response tokens")
    top = first[:, None] + 1 + np.arange(k)
    return TeacherScores(torch.from_numpy(ids[top]), torch.from_numpy(logprobs[top]),
                         torch.from_numpy(logprobs[first]))
