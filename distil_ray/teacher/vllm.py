"""Teacher backends behind one interface: ``score`` (top-k log-probs at every response position)
and ``load_weights`` (the teacher follows the policy's versions).

``VLLMTeacher`` scores with vLLM's ``prompt_logprobs``: ``teacher_prompt + response`` goes in as
the *prompt* of a one-token request, and the log-probs vLLM computes for every prompt position
are read back at the response positions. ``HFTeacher`` wraps the HF forward of
:func:`distil_ray.teacher.hf.score_topk`. Both return log-probs normalised over the full
vocabulary at T=1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from distil_ray.teacher.hf import TeacherScores, score_topk


def _empty_scores(k: int) -> TeacherScores:
    return TeacherScores(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0))


def _check_pairs(teacher_prompt_ids: Sequence, response_ids: Sequence) -> None:
    if len(teacher_prompt_ids) != len(response_ids):
        raise ValueError(
            f"one teacher prompt per response: got {len(teacher_prompt_ids)} prompts, {len(response_ids)} responses"
        )
    for prompt, response in zip(teacher_prompt_ids, response_ids):
        if len(prompt) == 0 and len(response) > 0:
            raise ValueError("the teacher prompt is empty: the first response token has no state")


class VLLMTeacher:
    """Top-k teacher scores from an in-process ``vllm.LLM``."""

    def __init__(self, model_path: str, *, max_logprobs: int = 64, **llm_kwargs):
        """``llm_kwargs``: ``make_llm``'s options; ``max_logprobs`` bounds the top-k it can score."""
        from distil_ray.rollout.vllm_engine import make_llm

        self.max_logprobs = max_logprobs
        self.llm = make_llm(model_path, max_logprobs=max_logprobs, **llm_kwargs)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def score(self, teacher_prompt_ids: list[list[int]], response_ids: list[list[int]], k: int) -> list[TeacherScores]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        _check_pairs(teacher_prompt_ids, response_ids)
        k = min(int(k), self.vocab_size)
        if k > self.max_logprobs:
            raise ValueError(
                f"teacher top-k={k} exceeds the engine's max_logprobs={self.max_logprobs}; "
                "the engine must be built with max_logprobs >= teacher.topk"
            )
        # empty responses have nothing to score: they skip the engine
        todo = [i for i, r in enumerate(response_ids) if len(r) > 0]
        out: list[TeacherScores] = [_empty_scores(k) for _ in response_ids]
        if todo:
            # One batched call: vLLM schedules the prefills together. max_tokens=1 because only the
            # prompt positions matter; detokenize=False skips decoding the k strings per position.
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
            inputs = [
                TokensPrompt(prompt_token_ids=[int(t) for t in teacher_prompt_ids[i]] + [int(t) for t in response_ids[i]])
                for i in todo
            ]
            results = self.llm.generate(inputs, params, use_tqdm=False)
            for i, result in zip(todo, results):
                out[i] = self._extract(result.prompt_logprobs, len(teacher_prompt_ids[i]), response_ids[i], k)
        return out

    @staticmethod
    def _extract(prompt_logprobs, prompt_len: int, response: Sequence[int], k: int) -> TeacherScores:
        rows = prompt_logprobs[prompt_len : prompt_len + len(response)]
        if len(rows) != len(response):
            raise RuntimeError(f"vLLM returned {len(rows)} prompt log-prob rows for {len(response)} response tokens")
        top_ids = torch.empty(len(response), k, dtype=torch.long)
        top_lp = torch.empty(len(response), k)
        token_lp = torch.empty(len(response))
        for t, (row, token) in enumerate(zip(rows, response)):
            token_lp[t] = row[int(token)].logprob
            # vLLM adds the actual token to the top-k dict (k+1 entries when it is not among
            # them); order by rank, then log-prob, and keep the best k.
            best = sorted(row.items(), key=lambda kv: (kv[1].rank, -kv[1].logprob))[:k]
            if len(best) < k:
                raise RuntimeError(f"vLLM returned {len(best)} log-probs at a position, expected {k}")
            top_ids[t] = torch.tensor([tok for tok, _ in best])
            top_lp[t] = torch.tensor([lp.logprob for _, lp in best])
        return TeacherScores(top_ids, top_lp, token_lp)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        from distil_ray.rollout.vllm_engine import reload_weights

        reload_weights(self.llm, named_tensors)

    def sequence_logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        from distil_ray.rollout.vllm_engine import prompt_token_logprobs

        return prompt_token_logprobs(self.llm, prompt, response)


class HFTeacher:
    """Top-k teacher scores from a HF causal LM forward (``score_topk``)."""

    def __init__(self, model_path: str, *, dtype: str = "float32", chunk_size: int = 256):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, local_files_only=True, dtype=getattr(torch, dtype)
        ).eval()
        self.chunk_size = chunk_size

    def score(self, teacher_prompt_ids: list[list[int]], response_ids: list[list[int]], k: int) -> list[TeacherScores]:
        _check_pairs(teacher_prompt_ids, response_ids)
        return score_topk(self.model, teacher_prompt_ids, response_ids, k, chunk_size=self.chunk_size)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        from distil_ray.rollout.hf_engine import load_named_tensors

        load_named_tensors(self.model, named_tensors)

    def sequence_logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        from distil_ray.rollout.hf_engine import forward_logprobs

        return forward_logprobs(self.model, prompt, response)
