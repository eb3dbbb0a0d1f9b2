"""RolloutWorker: one engine (``distil_ray.engines``) behind a Ray actor, streaming Rollout records.

A plain class (tests drive it directly); the driver makes it an actor with
``ray.remote(RolloutWorker).options(name=..., num_cpus=...)`` and reads rollouts as they complete
with ``worker.stream.options(num_returns="streaming").remote(prompts, sampling, version)``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from distil_ray.config import RolloutConfig
from distil_ray.engines import EngineOptions, SamplingConfig, build_engine
from distil_ray.engines.base import (EngineHolder, Weights, as_weights, configure_threads, restarted_actor,
                                     strip_stop_text)
from distil_ray.records import Prompt, Rollout


class RolloutWorker(EngineHolder):
    def __init__(self, model_path: str, cfg: RolloutConfig, *, dtype: str = "float32", seed: int = 0,
                 weight_transfer: str | None = None):
        """``cfg``: the ``rollout`` section (engine, KV cache, batch size); ``dtype``/``seed``: the
        model's compute dtype and the run's seed; ``weight_transfer``: the vLLM weight-transfer
        backend the engine opens for ``weight_sync.backend=collective`` (None: weights by
        :meth:`update_weights` only)."""
        cfg.check()  # before any thread or model set-up
        from transformers import AutoTokenizer

        # Threads first: the vLLM CPU worker disables torch.set_num_threads once it is built.
        self.num_threads = configure_threads()
        self.engine_name = cfg.engine
        options = EngineOptions(dtype=dtype, seed=seed, kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
                                max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len,
                                enforce_eager=cfg.enforce_eager, weight_transfer=weight_transfer)
        self.engine = build_engine(cfg.engine, model_path, options)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self._version = 0
        self.awaiting_weights = restarted_actor()  # the policy's weights were lost with the old process

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig, policy_version: int) -> Iterator[Rollout]:
        """Yield one Rollout per (prompt, sample) as each completes."""
        ids = [np.asarray(p.prompt_ids, dtype=np.int64).tolist() for p in prompts]
        for i, j, sample in self.engine.generate(ids, sampling):
            prompt = prompts[i]
            text = self.tokenizer.decode(sample.token_ids, skip_special_tokens=True)
            yield Rollout(
                prompt_uid=prompt.uid,
                sample_index=j,
                response_ids=np.asarray(sample.token_ids, dtype=np.int32),
                behaviour_logprobs=np.asarray(sample.logprobs, dtype=np.float32),
                finish_reason=sample.finish_reason,
                policy_version=int(policy_version),
                text=strip_stop_text(text, sampling.stop),
                prompt_ids=np.array(prompt.prompt_ids, dtype=np.int32),  # a copy: records never share buffers across prompts
            )

    def stream(self, prompts: list[Prompt], sampling: SamplingConfig,
               policy_version: int) -> Iterator[tuple[str, int] | Rollout]:
        """``generate`` for a driver that routes records without fetching them: each Rollout is
        preceded by a tiny header, its prompt uid and its token count (prompt + response), so the
        driver routes by the uid, balances the learner ranks by the counts, and passes the
        record's ObjectRef on untouched."""
        self.check_weights("rollout")
        for rollout in self.generate(prompts, sampling, policy_version):
            yield rollout.prompt_uid, len(rollout.prompt_ids) + len(rollout.response_ids)
            yield rollout

    def update_weights(self, state: Weights | dict[str, np.ndarray], version: int) -> float:
        """Load a full or partial HF-named state dict; returns the seconds spent loading."""
        start = time.perf_counter()
        # read-only (zero-copy) object-store arrays are copied once into tensors, which the engine
        # then copies into its own parameters
        self.engine.load_weights(as_weights(state).tensors())
        self._version = int(version)
        self.awaiting_weights = False
        return time.perf_counter() - start

    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        return self.engine.sequence_logprobs([int(t) for t in prompt_ids], [int(t) for t in response_ids])

