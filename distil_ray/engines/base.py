"""The engine interface: one inference engine per backend (vLLM, HF), shared by the rollout
workers and the teacher.

Engines are token-in/token-out: prompts arrive as token ids and samples leave as token ids with
the log-prob each token had under the distribution it was drawn from; the teacher's top-k is
scored on given token ids. Text never round-trips through a tokenizer inside an engine, so the
learner trains on exactly the tokens that were sampled and scored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class EngineOptions:
    """How an engine is built: what the rollout and teacher sections say, plus the run's dtype
    and seed. The HF engine reads ``dtype`` and ``seed`` only."""

    dtype: str = "float32"
    seed: int = 0
    kv_cache_memory_bytes: int = 64 << 20
    max_num_seqs: int = 64
    max_logprobs: int = 20  # the largest top-k the engine can score (vLLM sizes its buffers by it)
    max_model_len: int | None = None  # longest prompt + response the engine serves; None: the model's
    enforce_eager: bool | None = None  # vLLM without CUDA graphs; None: eager on the CPU only
    # vLLM's weight-transfer backend the engine opens (weight_sync.backend=collective): "nccl" on
    # GPUs, distil_ray's "distil_ray_gloo" on the CPU; None: weights come by load_weights only
    weight_transfer: str | None = None


@dataclass
class SamplingConfig:
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ()  # stop strings (the stop text is not part of the decoded output text)
    seed: int | None = None

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        if self.n < 1:
            raise ValueError(f"sampling.n={self.n!r}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature={self.temperature!r}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p={self.top_p!r}: must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens!r}: must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Sample:
    # Response ids, including the EOS token if one was generated (so the learner trains on
    # stopping) and the token that completed a stop string.
    token_ids: list[int]
    # Behaviour log-prob of each sampled token under the sampling distribution actually used
    # (temperature and top-p applied); greedy decoding reports the T=1 log-probs.
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"


@dataclass
class TeacherScores:
    topk_ids: torch.Tensor  # [T, k] int64
    topk_logprobs: torch.Tensor  # [T, k] float32, normalised over the full vocabulary
    token_logprobs: torch.Tensor  # [T]   log-prob of the student's sampled token


def empty_scores(k: int) -> TeacherScores:
    return TeacherScores(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0))


def check_pairs(prompt_ids: Sequence, response_ids: Sequence) -> None:
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"one teacher prompt per response: got {len(prompt_ids)} prompts, {len(response_ids)} responses")
    for prompt, response in zip(prompt_ids, response_ids):
        if len(prompt) == 0 and len(response) > 0:
            raise ValueError("the teacher prompt is empty: the first response token has no state")


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> Iterator[tuple[int, int, Sample]]:
        """Yield (prompt_index, sample_index, Sample) in COMPLETION order (streaming)."""
        ...

    def score_topk(self, prompt_ids: list[list[int]], response_ids: list[list[int]], k: int) -> list[TeacherScores]:
        """Top-k log-probs (T=1, full vocabulary) at every position of each response, given its
        prompt; plus the log-prob of the response's own token there."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named weights in place (no engine re-initialisation)."""
        ...

    def sequence_logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        """Log-prob of each response token under the current weights (T=1)."""
        ...


def sample_seed(seed: int | None, prompt_index: int, sample_index: int) -> int | None:
    """A distinct, reproducible seed for every (prompt, sample) pair of one call.

    SeedSequence mixes the three numbers so that nearby inputs give unrelated streams (a plain
    ``seed + i`` would make sample 1 of prompt 0 reuse sample 0 of prompt 1's stream).
    """
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1)[0] >> 1)


def stop_cut(token_ids: Sequence[int], decode: Callable[[Sequence[int]], str], stop: Sequence[str]) -> int | None:
    """Length of the shortest prefix of ``token_ids`` whose decoded text contains a stop string
    (the cut falls right after the token that completes it), or None if no stop string occurs."""
    if not stop or not any(s in decode(token_ids) for s in stop):
        return None
    # The first stop occurrence lies in some prefix; the shortest one is found by bisection since
    # "prefix text contains a stop string" is monotone in the prefix length.
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(token_ids[:mid]) for s in stop):
            hi = mid
        else:
            lo = mid + 1
    return lo


def strip_stop_text(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string (what the OpenAI/vLLM convention returns)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def configure_threads() -> int:
    """Give torch as many intra-op threads as the CPUs Ray assigned to the current actor (rounded
    up, at least 1) and return the count; outside an actor torch's setting stays. Must run before
    a vLLM CPU engine is built: its worker replaces ``torch.set_num_threads`` with a no-op for the
    rest of the process.
    """
    num_threads = _ray_assigned_cpus()
    if num_threads is None:
        return torch.get_num_threads()
    num_threads = max(1, int(num_threads))
    torch.set_num_threads(num_threads)
    os.environ["OMP_NUM_THREADS"] = str(num_threads)
    return num_threads


def _ray_assigned_cpus() -> int | None:
    import ray

    if not ray.is_initialized():  # outside Ray: nothing assigned
        return None
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # a driver (or task) holds no actor resources
        return None
    cpus = context.get_assigned_resources().get("CPU")
    return None if cpus is None else max(1, math.ceil(cpus))


@dataclass
class Weights:
    """HF-named weights in the engines' dtype, as numpy arrays: what goes through the object store
    at a weight sync (numpy arrays are read zero-copy). numpy has no bfloat16, so bfloat16 weights
    travel as their int16 bit patterns and come back as bfloat16 tensors: half the bytes of the
    float32 master weights, bit for bit what an engine would make of them."""

    dtype: str  # "float32" | "bfloat16"
    arrays: dict[str, np.ndarray]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], dtype: str) -> "Weights":
        target = getattr(torch, dtype)
        if dtype == "bfloat16":
            arrays = {n: t.detach().to(target).view(torch.int16).cpu().numpy() for n, t in tensors.items()}
        else:
            arrays = {n: t.detach().to(target).cpu().numpy() for n, t in tensors.items()}
        return cls(dtype, arrays)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, array in self.arrays.items():
            tensor = as_tensor(array)
            yield name, tensor.view(torch.bfloat16) if self.dtype == "bfloat16" else tensor

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def as_weights(state: "Weights | Mapping[str, np.ndarray]") -> Weights:
    """A sync's weights, or a plain mapping of arrays (taken as they are, e.g. float32)."""
    if isinstance(state, Weights):
        return state
    return Weights(dtype="", arrays=dict(state))


def as_tensor(value) -> torch.Tensor:
    """A numpy array (e.g. a weight from the object store) as a torch tensor."""
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    # Arrays read zero-copy from Ray's object store are read-only, which torch.from_numpy
    # warns about (a write through the tensor would be undefined): copy those.
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


class EngineRestarted(RuntimeError):
    """An engine actor that Ray restarted holds the starting weights, not the policy's: it refuses
    work until the driver sends it the weights it should hold."""


def restarted_actor() -> bool:
    """Whether this process is a Ray actor that Ray has restarted (False outside Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return False
        context = ray.get_runtime_context()
        return context.get_actor_id() is not None and bool(context.was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - no Ray, or not a worker: not a restarted actor
        return False


class EngineHolder:
    """What a weight sync asks of an actor that holds an engine (the rollout workers, the
    teacher): the policy version it holds, and vLLM's weight-transfer protocol driven by learner
    rank 0 (``weight_sync.backend=collective``, learner/transfer.py). Expects ``self.engine`` and
    ``self._version``.

    An engine that follows the policy and whose actor Ray restarted (the old process was killed)
    starts from the checkpoint's weights again: ``awaiting_weights`` is then set, and
    :meth:`check_weights` refuses work until a weight update arrives."""

    engine: Engine
    _version: int
    awaiting_weights: bool = False

    def version(self) -> int:
        return self._version

    def check_weights(self, what: str) -> None:
        if self.awaiting_weights:
            raise EngineRestarted(f"{what}: this actor was restarted and holds the starting weights; "
                                  "it works again once the policy's weights are sent")

    def weight_transfer(self, phase: str, info: dict | None = None, version: int | None = None) -> None:
        """One phase of the protocol (see ``VLLMEngine.weight_transfer``); a completed ``receive``
        makes ``version`` this engine's policy version."""
        self.engine.weight_transfer(phase, info)
        if phase == "receive" and version is not None:
            self._version = int(version)
            self.awaiting_weights = False
